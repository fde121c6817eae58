"""
Write the serialized pipelines in `pipelines/` and `served/` from code (`--check` fails when committed files differ).

The pipeline part of each file is `Pipeline.dumps()` output; `inputs:`/`outputs:` are added for
`hayhooks pipeline deploy-yaml`, which requires every declared input, so only the everyday ones are declared.
"""

import argparse
import sys
from pathlib import Path

import yaml
from haystack import Pipeline

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components import HuggingFaceAPITextToImage  # noqa: E402
from components.diffusers_text_to_image import DiffusersTextToImage  # noqa: E402

COMPONENT = "text_to_image"
DEPLOY_IO = {
    "inputs": {name: f"{COMPONENT}.{name}" for name in ("prompt", "width", "height")},
    "outputs": {"images": f"{COMPONENT}.images"},
}


def pipeline_files() -> dict[Path, str]:
    """Each pipeline file's path and its text: one per backend, chosen at serving time by IMAGE_GENERATION_BACKEND."""
    files = {}
    for name, generator in (
        ("image_generation.yml", HuggingFaceAPITextToImage()),
        ("image_generation_local.yml", DiffusersTextToImage()),
    ):
        pipeline = Pipeline()
        pipeline.add_component(COMPONENT, generator)
        files[ROOT / "pipelines" / name] = pipeline.dumps() + yaml.safe_dump(DEPLOY_IO, sort_keys=False)
    # The JSON variant: the API pipeline as a top-level YAML of the served folder, which Hayhooks deploys at startup
    # as `/image_generation_json/run` (in durable mode too), so no deployment route is needed to serve it.
    files[ROOT / "served" / "image_generation_json.yml"] = files[ROOT / "pipelines" / "image_generation.yml"]
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
