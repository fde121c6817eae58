"""
Write the serialized pipelines in `pipelines/` and `served/` from code (`--check` fails when committed files differ).

Each is a generator (or an editor), then `AIImageMarker` on its images. The pipeline part of each file is
`Pipeline.dumps()` output; `inputs:`/`outputs:` are added for `hayhooks pipeline deploy-yaml`, which requires every
declared input, so only the everyday ones are declared.
"""

import argparse
import sys
from pathlib import Path

import yaml
from haystack import Pipeline

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components import AIImageMarker, HuggingFaceAPITextToImage  # noqa: E402
from components.diffusers_image_to_image import DiffusersImageToImage  # noqa: E402
from components.diffusers_text_to_image import DiffusersTextToImage  # noqa: E402
from components.hf_api_image_to_image import HuggingFaceAPIImageToImage  # noqa: E402

COMPONENT = "text_to_image"
EDIT_COMPONENT = "image_to_image"
MARKER = "ai_image_marker"
DEPLOY_INPUTS = {COMPONENT: ("prompt", "width", "height"), EDIT_COMPONENT: ("image", "prompt")}
# The marker's inputs fed by the same declared input as the generator's (an edit's image is the marked one's source);
# the prompts reach it in its images' meta.
MARKER_INPUTS = {"image": "source"}


def serialized(component_name: str, component: object) -> str:
    """The component then `AIImageMarker`: `Pipeline.dumps()`, with the inputs and outputs `deploy-yaml` reads."""
    pipeline = Pipeline()
    pipeline.add_component(component_name, component)
    pipeline.add_component(MARKER, AIImageMarker())
    pipeline.connect(f"{component_name}.images", f"{MARKER}.images")
    inputs: dict[str, str | list[str]] = {}
    for name in DEPLOY_INPUTS[component_name]:
        marker = MARKER_INPUTS.get(name)
        inputs[name] = [f"{component_name}.{name}", f"{MARKER}.{marker}"] if marker else f"{component_name}.{name}"
    deploy_io = {"inputs": inputs, "outputs": {"images": f"{MARKER}.images"}}
    return pipeline.dumps() + yaml.safe_dump(deploy_io, sort_keys=False)


def pipeline_files() -> dict[Path, str]:
    """Each pipeline file's path and its text: one per backend, chosen at serving time by IMAGE_GENERATION_BACKEND."""
    pipelines, editing = ROOT / "pipelines", ROOT / "pipelines" / "image_editing"
    files = {
        pipelines / "image_generation.yml": serialized(COMPONENT, HuggingFaceAPITextToImage()),
        pipelines / "image_generation_local.yml": serialized(COMPONENT, DiffusersTextToImage()),
        editing / "image_editing.yml": serialized(EDIT_COMPONENT, HuggingFaceAPIImageToImage()),
        editing / "image_editing_local.yml": serialized(EDIT_COMPONENT, DiffusersImageToImage()),
    }
    # The JSON variants are wrappers on the serving layer (served/image_generation_json/, served/image_editing_json/)
    # that load these files with the operator's settings applied.
    return files


def main() -> int:
    """Write the files, or with `--check` report the ones that differ and exit 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    stale = []
    for path, text in pipeline_files().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.relative_to(ROOT))
        else:
            path.write_text(text)
    for path in stale:
        print(f"{path} differs from what the code dumps: run python scripts/build_pipelines.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
