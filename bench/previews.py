"""Benchmark of live previews: the local backend's generation time with and without 3 previews, side by side.

Run from the repository root, with the `local` extra installed:

    python bench/previews.py            # about 5 minutes on 2 busy CPU cores

It builds the tiny random-weight Stable Diffusion model of `scripts/tiny_diffusers.py` in a temp dir, with an 8x
latent as in Stable Diffusion (a 512² image is a 64² latent). It is the only model available offline: its UNet is
far cheaper than a real one, so the previews' share of the time is larger here than on a real model. It then
times `DiffusersTextToImage.run` at 512², alternately with 3 previews asked for and with none, same seed, same
progress callback. The table is printed and written to `bench/RESULTS-previews.md`.
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from haystack.utils import ComponentDevice

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from tiny_diffusers import build  # noqa: E402

from components.diffusers_text_to_image import DiffusersTextToImage  # noqa: E402
from components.image_codec import encode  # noqa: E402
from components.previews import PREVIEW_MAX_SIDE, LatentPreviewer  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, photo"
PREVIEWS = 3


def compare(model: Path, size: int, steps: int, rounds: int) -> tuple[float, float, float, int]:
    """Median seconds per image without and with previews, the median of the per-round ratios, previews per image."""
    component = DiffusersTextToImage(
        model=str(model), device=ComponentDevice.from_str("cpu"), num_inference_steps=steps
    )
    component.warm_up()
    seen: list[dict] = []

    def timed(previews: int, seed: int) -> float:
        seen.clear()
        started = time.perf_counter()
        params = {"progress_callback": seen.append, "previews": previews}
        component.run(prompt=PROMPT, width=size, height=size, seed=seed, **params)
        return time.perf_counter() - started

    timed(PREVIEWS, 0), timed(0, 0)  # warm-up
    times: dict[int, list[float]] = {0: [], PREVIEWS: []}
    made = 0
    for seed in range(rounds):
        for previews in (0, PREVIEWS) if seed % 2 else (PREVIEWS, 0):
            times[previews].append(timed(previews, seed))
            if previews:
                made = sum(event["phase"] == "preview" for event in seen)
    ratios = [w / wo for w, wo in zip(times[PREVIEWS], times[0], strict=True)]
    return statistics.median(times[0]), statistics.median(times[PREVIEWS]), statistics.median(ratios), made


def preview_cost(model: Path, size: int, repeats: int = 50) -> float:
    """Median seconds of one preview alone (projection and PNG encoding) of a `size`² image's latents."""
    component = DiffusersTextToImage(model=str(model), device=ComponentDevice.from_str("cpu"))
    component.warm_up()
    pipeline = component._loaded.pipeline
    previewer = LatentPreviewer(pipeline)
    side = size // pipeline.vae_scale_factor
    latents = torch.randn(1, pipeline.vae.config.latent_channels, side, side)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        encode(previewer(latents, size, size), "png")
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS-previews.md alone")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="bench-previews-") as tmp:
        model = build(Path(tmp) / "tiny-sd", vae_scale_factor=8)
        without, with_, ratio, made = compare(model, args.size, args.steps, args.rounds)
        one = preview_cost(model, args.size)
    added = (ratio - 1) * 100
    rows = [
        ("figure", "no previews", f"{PREVIEWS} previews", "target", "met"),
        ("---",) * 5,
        (f"wall time per image, {args.size}², {args.steps} steps, CPU (median of {args.rounds})",
         f"{without * 1000:.0f} ms",
         f"{with_ * 1000:.0f} ms ({added:+.1f}%, median of paired ratios)", "≤ +5%", "yes" if added <= 5 else "**no**"),
        ("previews made per image (latent-to-RGB projection, PNG)", "0", f"{made}, ≤ {PREVIEW_MAX_SIDE} px", "3", ""),
        ("one preview alone (projection + PNG), median of 50", "", f"{one * 1000:.2f} ms: {PREVIEWS} are "
         f"{PREVIEWS * one / without * 100:.2f}% of the image", "≤ +5%", "yes" if PREVIEWS * one / without <= 0.05
         else "**no**"),
    ]  # fmt: skip
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"Preview benchmark {stamp} on {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        "the tiny random-weight SD model of scripts/tiny_diffusers.py with an 8x latent (the only model available "
        "offline; a real model's steps cost far more, so the previews' share is smaller there)."
    )
    print(f"{header}\n\n{table}")
    if not args.no_write:
        text = f"# Preview benchmark\n\n{header}\n\nCommand: `python bench/previews.py`\n\n{table}\n"
        (ROOT / "bench" / "RESULTS-previews.md").write_text(text)


if __name__ == "__main__":
    main()
