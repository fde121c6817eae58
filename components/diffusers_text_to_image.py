"""`DiffusersTextToImage`: text-to-image with a local diffusers pipeline, on a GPU or the CPU."""

import asyncio
import inspect
import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import pybase64
from haystack import component, default_from_dict, default_to_dict, logging
from haystack.lazy_imports import LazyImport
from haystack.utils import ComponentDevice

from components.errors import GenerationTimeoutError, ImageGenerationError, InvalidRequestError
from components.image_codec import encode
from components.previews import LatentPreviewer, preview_steps
from components.progress import ProgressCallback
from components.request import MAX_STEPS, GenerationRequest, OutputFormat
from components.settings import generator_settings, value_or
from components.text_to_image_base import TextToImageBase

with LazyImport(message="Run 'pip install \".[local]\"' to use the local diffusers backend.") as torch_import:
    import torch
    from diffusers import AutoencoderTiny, AutoPipelineForText2Image

logger = logging.getLogger(__name__)

DEFAULT_LOCAL_MODEL = "stabilityai/sd-turbo"
Dtype = Literal["auto", "float32", "float16", "bfloat16"]


@dataclass(frozen=True)
class LoadedModel:
    """A diffusers pipeline in memory, and the lock that gives it to one generation at a time."""

    pipeline: Any
    device: str
    lock: threading.Lock
    size_multiple: int
    interruptible: bool
    # Pipelines for other tasks built on the same weights (`from_pipe`), by task, made on first use under `lock`.
    derived: dict[str, Any] = field(default_factory=dict)


_LOADED: dict[tuple[str, str, str, bool], LoadedModel] = {}
_DECODERS: dict[tuple[str, str, str], Any] = {}
_LOAD_LOCK = threading.Lock()


def load(model: str, device: str, dtype: Dtype, cpu_offload: bool) -> LoadedModel:
    """The pipeline for these settings, loaded on first use: one copy of the weights per process."""
    key = (model, device, dtype, cpu_offload)
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = _load(*key)
        return _LOADED[key]


def _load(model: str, device: str, dtype: Dtype, cpu_offload: bool) -> LoadedModel:
    folder = Path(model).expanduser()
    if not folder.is_dir() and model.startswith(("/", ".", "~")):
        raise ValueError(f"the diffusers model folder {model} does not exist")
    torch_dtype = pick_dtype(dtype, device)
    logger.info("Loading diffusers model {model} on {device} ({dtype})", model=model, device=device, dtype=torch_dtype)
    started = time.monotonic()
    try:
        source = str(folder) if folder.is_dir() else model
        pipeline = AutoPipelineForText2Image.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"could not load the diffusers model {model}: {e}") from e
    if cpu_offload:
        pipeline.enable_model_cpu_offload(device=device)
    else:
        pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    interruptible = "callback_on_step_end" in inspect.signature(pipeline.__call__).parameters
    if not interruptible:
        logger.warning("{cls} has no step callback: deadlines cannot stop it", cls=type(pipeline).__name__)
    logger.info(
        "Loaded {cls} from {model} in {seconds:.1f} s",
        cls=type(pipeline).__name__,
        model=model,
        seconds=time.monotonic() - started,
    )
    return LoadedModel(pipeline, device, threading.Lock(), size_multiple(pipeline), interruptible)


def load_decoder(model: str, device: str, dtype: Dtype) -> "AutoencoderTiny":
    """The tiny autoencoder (TAESD) for previews, loaded on first use: one copy per process."""
    key = (model, device, dtype)
    with _LOAD_LOCK:
        if key not in _DECODERS:
            folder = Path(model).expanduser()
            if not folder.is_dir() and model.startswith(("/", ".", "~")):
                raise ValueError(f"the preview decoder folder {model} does not exist")
            try:
                decoder = AutoencoderTiny.from_pretrained(str(folder) if folder.is_dir() else model)
            except (OSError, ValueError) as e:
                raise RuntimeError(f"could not load the preview decoder {model}: {e}") from e
            _DECODERS[key] = decoder.to(device, pick_dtype(dtype, device)).eval()
        return _DECODERS[key]


def pick_dtype(dtype: Dtype, device: str) -> "torch.dtype":
    """`auto`: bfloat16 (else float16) on a GPU, float32 on the CPU."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32 if device == "cpu" else torch.float16


def size_multiple(pipeline: Any) -> int:
    """What width and height must be multiples of: the VAE's scale, times 2 for transformers on 2x2 patches."""
    scale = int(getattr(pipeline, "vae_scale_factor", 8))
    return scale * 2 if getattr(pipeline, "transformer", None) is not None else scale


def served_name(model: str) -> str:
    """The model id clients see and may ask for: the Hub id, or a local folder's name."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return model
    return re.sub(r"[^A-Za-z0-9._-]+", "-", folder.resolve().name).strip("-._") or "local"


@component
class DiffusersTextToImage(TextToImageBase):
    """
    Generates images from text with a diffusers pipeline on this machine.

    It has the same inputs, output and meta as `HuggingFaceAPITextToImage`.

    A batch of `n` images is `n` single-image generations, one after another (a batched call with one generator
    per image does not give the same pixels as the images made alone).

    Any text-to-image pipeline that `AutoPipelineForText2Image` loads works, from a Hub id or a local folder. The
    weights are loaded once per process in `warm_up()`; generations on one device run one at a time, off the event
    loop, and stop at the next denoising step when their deadline passes or their caller goes away.

    A run asked for `previews=n` reports `n` small images of the generation in progress to its `progress_callback`,
    at evenly spaced steps (`components.previews`); the final image is the same bytes either way.

    Usage:
    ```python
    generator = DiffusersTextToImage(model="stabilityai/sd-turbo")
    generator.warm_up()
    image = generator.run(prompt="A cat sitting on a rainbow", num_inference_steps=2, guidance_scale=0.0)
    ```
    """

    concurrent_batches = False  # one device: a batch's images are made one after another

    def __init__(  # noqa: PLR0913
        self,
        model: str | None = None,
        device: ComponentDevice | None = None,
        dtype: Dtype = "auto",
        cpu_offload: bool = False,
        width: int = 512,
        height: int = 512,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        output_format: OutputFormat = "png",
        size_multiple: int | None = None,
        max_steps: int = MAX_STEPS,
        timeout: float | None = None,
        preview_decoder: str | None = None,
    ) -> None:
        """
        Create the component; nothing is imported from the Hub or loaded until `warm_up()`.

        :param model: Hub model id or local folder; else stabilityai/sd-turbo.
        :param device: The device, e.g. `ComponentDevice.from_str("cuda:1")`; `None` takes Haystack's default
            (a GPU, then XPU, then MPS, then the CPU).
        :param dtype: `auto` (bfloat16 or float16 on a GPU, float32 on the CPU), `float32`, `float16` or `bfloat16`.
        :param cpu_offload: Keep each model part on the CPU until it runs: less GPU memory, slower.
        :param width: Default width in pixels.
        :param height: Default height in pixels.
        :param num_inference_steps: Default number of denoising steps; `None` uses the pipeline's default.
        :param guidance_scale: Default guidance scale; `None` uses the pipeline's default.
        :param output_format: Default image format: `png`, `jpeg` or `webp`.
        :param size_multiple: What width and height must be multiples of; `None` derives it from the model.
        :param max_steps: The most denoising steps a request may ask for.
        :param timeout: Deadline in seconds for one image; else 120.
        :param preview_decoder: Hub id or local folder of a tiny autoencoder (`AutoencoderTiny`, e.g. TAESD for SD
            1.x/2.x, TAESDXL, TAESD3, TAEF1) that decodes previews; `None` projects the latents to RGB with no extra
            weights.
        """
        torch_import.check()
        if device is not None and not isinstance(device, ComponentDevice):
            raise ValueError(f"device={device!r} must be a ComponentDevice or None")
        if dtype not in get_args(Dtype):
            raise ValueError(f"dtype={dtype!r} must be one of {', '.join(get_args(Dtype))}")
        if size_multiple is not None and size_multiple < 1:
            raise ValueError(f"size_multiple={size_multiple!r} must be positive")
        if not 1 <= max_steps <= MAX_STEPS:
            raise ValueError(f"max_steps={max_steps!r} must be in 1..{MAX_STEPS}")
        self.model = model
        self.device = device
        self.dtype = dtype
        self.cpu_offload = cpu_offload
        self.defaults = GenerationRequest(
            prompt="-", negative_prompt=None, width=width, height=height, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, seed=0, model="local", output_format=output_format,
        )  # fmt: skip
        self.defaults.validate()
        self.size_multiple = size_multiple
        self.max_steps = max_steps
        self.timeout = timeout
        self.preview_decoder = preview_decoder
        self._loaded: LoadedModel | None = None
        self._previewer: LatentPreviewer | None = None

    def warm_up(self) -> None:
        """Load the model (once per process, whichever instance asks first) and resolve the settings. Idempotent."""
        if self.settings is not None:
            return
        model = value_or(self.model, DEFAULT_LOCAL_MODEL)
        device = ComponentDevice.resolve_device(self.device).to_torch_str()
        loaded = load(model, device, self.dtype, self.cpu_offload)
        name = served_name(model)
        settings = generator_settings(allowed_models=[name], timeout=self.timeout, max_image_bytes=None)
        decoder = load_decoder(self.preview_decoder, device, self.dtype) if self.preview_decoder else None
        self._previewer = LatentPreviewer(loaded.pipeline, decoder)
        self._loaded = loaded
        self.defaults = replace(self.defaults, model=name)
        self.settings = settings

    def ready(self) -> bool:
        """Whether the model is loaded, and on a device that is still there (a GPU can fail or vanish)."""
        if not TextToImageBase.ready(self) or self._loaded is None:  # @component rebuilds the class: no super()
            return False
        device = str(self._loaded.pipeline.device)
        return not device.startswith("cuda") or torch.cuda.is_available()

    async def warm_up_async(self) -> None:
        """Like `warm_up`, off the event loop."""
        if self.settings is None:
            await asyncio.to_thread(self.warm_up)

    def to_dict(self) -> dict[str, Any]:
        """Serialize the component."""
        d = self.defaults
        return default_to_dict(
            self,
            model=self.model,
            device=self.device.to_dict() if self.device is not None else None,
            dtype=self.dtype,
            cpu_offload=self.cpu_offload,
            width=d.width,
            height=d.height,
            num_inference_steps=d.num_inference_steps,
            guidance_scale=d.guidance_scale,
            output_format=d.output_format,
            size_multiple=self.size_multiple,
            max_steps=self.max_steps,
            timeout=self.timeout,
            preview_decoder=self.preview_decoder,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiffusersTextToImage":
        """Deserialize the component."""
        init = data["init_parameters"]
        if init.get("device") is not None:
            init["device"] = ComponentDevice.from_dict(init["device"])
        return default_from_dict(cls, data)

    def _check(self, request: GenerationRequest) -> None:
        assert self._loaded is not None
        multiple = self.size_multiple or self._loaded.size_multiple
        for name in ("width", "height"):
            if getattr(request, name) % multiple:
                raise InvalidRequestError(f"{name}={getattr(request, name)} must be a multiple of {multiple} here")
        if request.num_inference_steps is not None and request.num_inference_steps > self.max_steps:
            raise InvalidRequestError(f"num_inference_steps={request.num_inference_steps} must be ≤ {self.max_steps}")

    def backend_meta(self) -> dict[str, Any]:
        """The meta every image carries about the backend: `backend`, `provider` (`local`) and `device`."""
        assert self._loaded is not None
        return {"backend": "diffusers", "provider": "local", "device": self._loaded.device}

    def _produce(self, request: GenerationRequest, report: ProgressCallback, previews: int) -> bytes:
        return self._generate(request, report, previews, threading.Event())

    async def _produce_async(self, request: GenerationRequest, report: ProgressCallback, previews: int) -> bytes:
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(self._generate, request, report, previews, cancel)
        except asyncio.CancelledError:
            cancel.set()  # the thread stops at its next step instead of finishing an image nobody waits for
            raise

    def _generate(
        self, request: GenerationRequest, report: ProgressCallback, previews: int, cancel: threading.Event
    ) -> bytes:
        assert self._loaded is not None and self.settings is not None
        loaded, timeout = self._loaded, self.settings.timeout
        with loaded.lock:
            deadline = time.monotonic() + timeout
            stop = _StepWatch(request, report, cancel, deadline, self._previewer if previews else None, previews)
            generator = torch.Generator("cpu" if loaded.device == "mps" else loaded.device)
            kwargs = {
                "prompt": request.prompt, "negative_prompt": request.negative_prompt, "width": request.width,
                "height": request.height, "output_type": "pil", "generator": generator.manual_seed(request.seed),
            }  # fmt: skip
            if request.num_inference_steps is not None:
                kwargs["num_inference_steps"] = request.num_inference_steps
            if request.guidance_scale is not None:
                kwargs["guidance_scale"] = request.guidance_scale
            pipeline = self._pipeline_for(loaded, request, kwargs)
            if loaded.interruptible:
                kwargs["callback_on_step_end"] = stop
            started = time.monotonic()
            image = pipeline(**kwargs).images[0]
            if stop.steps_done:  # counted by the step callback: a pipeline without one reports nothing
                report({"phase": "denoised", "steps": stop.steps_done, "seconds": time.monotonic() - started})
            if loaded.device == "cuda":
                report(
                    {
                        "phase": "device_memory",
                        "device_memory_bytes": torch.cuda.memory_allocated(),
                        "device_memory_peak_bytes": torch.cuda.max_memory_allocated(),
                    }
                )
        if stop.reason == "deadline":
            raise GenerationTimeoutError(f"generation stopped at step {stop.steps_done}: past the {timeout} s deadline")
        if stop.reason == "cancelled":
            raise ImageGenerationError("generation cancelled: nobody is waiting for it")
        return encode(image, request.output_format)

    def _pipeline_for(self, loaded: LoadedModel, request: GenerationRequest, kwargs: dict[str, Any]) -> Any:
        """The pipeline that serves `request`, its call arguments completed in `kwargs` (the loaded one here)."""
        return loaded.pipeline


class _StepWatch:
    """
    The `callback_on_step_end` of one generation: reports each step, and interrupts on cancel or past the deadline.

    Each step goes to the run's progress callback (an exception it raises stops the generation there), and so do the
    previews asked for, at their steps; every 10% of the steps also goes to the log.
    """

    def __init__(  # noqa: PLR0913
        self,
        request: GenerationRequest,
        report: ProgressCallback,
        cancel: threading.Event,
        deadline: float,
        previewer: LatentPreviewer | None = None,
        previews: int = 0,
    ) -> None:
        self.request = request
        self.report = report
        self.cancel = cancel
        self.deadline = deadline
        self.previewer = previewer
        self.previews = previews
        self.preview_at: list[int] | None = None  # the preview steps, in order, once the number of steps is known
        self.steps_done = 0
        self.reason: str | None = None

    def __call__(self, pipeline: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        self.steps_done = step + 1
        total = getattr(pipeline, "num_timesteps", None) or self.steps_done
        if self.steps_done == total or self.steps_done % max(1, total // 10) == 0:
            logger.info("Seed {seed}: step {step}/{total}", seed=self.request.seed, step=self.steps_done, total=total)
        self.report({"phase": "step", "step": self.steps_done, "steps": total})
        if self.previewer is not None:
            if self.preview_at is None:
                self.preview_at = sorted(preview_steps(total, self.previews))
            if self.steps_done in self.preview_at:
                self._preview(tensors.get("latents"), self.preview_at.index(self.steps_done), total)
        if self.cancel.is_set():
            self.reason = "cancelled"
        elif time.monotonic() > self.deadline:
            self.reason = "deadline"
        if self.reason is not None:
            pipeline._interrupt = True
        return tensors

    def _preview(self, latents: Any, index: int, total: int) -> None:
        """Report preview `index` of the latents at this step; a preview that fails is skipped, never the image."""
        assert self.previewer is not None
        request = self.request
        try:
            image = self.previewer(latents, request.width, request.height)
            data = encode(image, request.output_format)
        except Exception as e:  # a preview is a courtesy: the generation goes on without it
            logger.warning("Preview at step {step} failed: {error}", step=self.steps_done, error=type(e).__name__)
            return
        self.report(
            {
                "phase": "preview", "index": index, "previews": len(self.preview_at or ()), "step": self.steps_done,
                "steps": total, "image": pybase64.b64encode_as_string(data),
                "mime_type": f"image/{request.output_format}", "width": image.width, "height": image.height,
            }
        )  # fmt: skip
