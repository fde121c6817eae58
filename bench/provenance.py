"""
Cost of marking images as AI-made: CPU per image and bytes added, XMP alone and XMP plus C2PA signing.

    python bench/provenance.py            # needs the c2pa extra: pip install '.[c2pa]'

For 512² and 1024² upstream images in each format (photo-like, as the fake upstream renders them), it times
`ImageResults.finish` (what every image goes through: sniff, mark, ETag, base64) three ways in the same run:
unmarked (marking replaced by a no-op, the baseline), XMP only (the default), and XMP + C2PA (a test CA made here,
ES256, no timestamp authority). Interleaved rounds, median of the CPU time per image. Every signed image is checked
with c2pa's Reader, and the coded pixels of every output are checked to be the upstream's, byte for byte.
"""

import argparse
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import c2pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from c2pa_ca import make_credentials
from fake_upstream import render
from image_parts import coded_pixels

from components.image_codec import sniff
from components.image_results import ImageResults
from components.provenance import Provenance, ProvenanceSettings
from components.request import GenerationRequest
from components.settings import serving_settings

FORMATS = ("png", "jpeg", "webp")


class Unmarked(Provenance):
    """The baseline: the bytes go out as they came."""

    def mark(self, data: bytes, request: GenerationRequest, size: tuple[int, int]) -> bytes:
        return data


def results(provenance: Provenance) -> ImageResults:
    settings = serving_settings(
        allowed_models=None, timeout=None, max_image_bytes=None, max_concurrency=None, max_queue=None,
        cache_max_bytes=0,
    )  # fmt: skip
    image_results = ImageResults(settings, {"backend": "bench"}, "black-forest-labs/FLUX.1-schnell")
    image_results.provenance = provenance
    return image_results


def finish_once(variant: ImageResults, request: GenerationRequest, raw: bytes) -> tuple[float, bytes]:
    started = time.process_time()
    image = variant.finish(request, raw, sniff(raw), time.monotonic())
    return time.process_time() - started, base64.b64decode(image.base64_image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40, help="images per variant, size and format")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        chain, key = make_credentials(Path(tmp))
        plain = ProvenanceSettings(embed_parameters=False, c2pa_cert=None, c2pa_key=None, c2pa_tsa_url=None)
        signed = ProvenanceSettings(embed_parameters=False, c2pa_cert=chain, c2pa_key=key, c2pa_tsa_url=None)
        variants = {
            "unmarked": results(Unmarked(plain)),
            "xmp": results(Provenance(plain)),
            "xmp+c2pa": results(Provenance(signed)),
        }
    print(f"c2pa-python {c2pa.__version__}, {os.cpu_count()} CPUs, median of {args.rounds} images per cell")
    print("| size | format | upstream bytes | unmarked CPU ms | XMP: CPU ms (x) | XMP: bytes added "
          "| XMP+C2PA: CPU ms (x) | XMP+C2PA: bytes added |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for side in (512, 1024):
        for fmt in FORMATS:
            raw = render("provenance bench", 1, side, side, fmt)
            request = GenerationRequest(
                prompt="provenance bench", negative_prompt=None, width=side, height=side, num_inference_steps=None,
                guidance_scale=None, seed=1, model="black-forest-labs/FLUX.1-schnell", output_format=fmt,
            )  # fmt: skip
            cpu: dict[str, list[float]] = {name: [] for name in variants}
            size: dict[str, int] = {}
            for _ in range(args.rounds):
                for name, variant in variants.items():
                    seconds, data = finish_once(variant, request, raw)
                    cpu[name].append(seconds)
                    size[name] = len(data)
                    assert coded_pixels(data, fmt) == coded_pixels(raw, fmt)
            with c2pa.Reader(f"image/{fmt}", io.BytesIO(data)) as reader:
                codes = [s["code"] for s in json.loads(reader.json()).get("validation_status", [])]
            assert codes == ["signingCredential.untrusted"], codes
            base = statistics.median(cpu["unmarked"]) * 1000
            cells = [str(side) + "²", fmt, str(len(raw)), f"{base:.2f}"]
            for name in ("xmp", "xmp+c2pa"):
                median = statistics.median(cpu[name]) * 1000
                cells += [f"{median:.2f} ({median / base:.2f}x)", f"+{size[name] - len(raw)}"]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
