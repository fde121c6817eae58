"""
Cost of marking images as AI-made: CPU per image and bytes added, XMP alone and XMP plus C2PA signing.

    python bench/provenance.py            # needs the c2pa extra: pip install '.[c2pa]'

For 512² and 1024² upstream images in each format (photo-like, as the fake upstream renders them), it times what
an image goes through after the upstream (wrapped in base64 with the generator's meta, then `AIImageMarker`) three
ways in the same run: unmarked (no marker, the baseline), XMP only (the default), and XMP + C2PA (a test CA made
here, ES256, no timestamp authority). Interleaved rounds, median of the CPU time per image. Every signed image is
checked with c2pa's Reader, and the coded pixels of every output are checked to be the upstream's, byte for byte.
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
import pybase64
from c2pa_ca import make_credentials
from fake_upstream import render
from haystack.dataclasses import ImageContent
from image_parts import coded_pixels

from components import AIImageMarker
from image_generation_server.allocator import tune_allocator

FORMATS = ("png", "jpeg", "webp")
MODEL = "black-forest-labs/FLUX.1-schnell"


def finish_once(marker: AIImageMarker | None, raw: bytes, fmt: str, side: int) -> tuple[float, bytes]:
    """CPU seconds to wrap the upstream's bytes as the generator does, then mark them (unless `marker` is None)."""
    started = time.process_time()
    meta = {"model": MODEL, "seed": 1, "prompt": "provenance bench", "format": fmt, "width": side, "height": side}
    image = ImageContent(
        base64_image=pybase64.b64encode_as_string(raw), mime_type=f"image/{fmt}", meta=meta, validation=False
    )
    if marker is not None:
        [image] = marker.run(images=[image])["images"]
    return time.process_time() - started, base64.b64decode(image.base64_image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40, help="images per variant, size and format")
    args = parser.parse_args()
    tune_allocator()  # as the server does: image buffers from memory the process keeps, not fresh pages
    with tempfile.TemporaryDirectory() as tmp:
        chain, key = make_credentials(Path(tmp))
        signed = AIImageMarker(c2pa_cert=str(chain), c2pa_key=str(key))
        signed.warm_up()  # reads the credentials, while they exist
        variants: dict[str, AIImageMarker | None] = {"unmarked": None, "xmp": AIImageMarker(), "xmp+c2pa": signed}
    print(f"c2pa-python {c2pa.__version__}, {os.cpu_count()} CPUs, median of {args.rounds} images per cell")
    print("| size | format | upstream bytes | unmarked CPU ms | XMP: CPU ms (x) | XMP: bytes added "
          "| XMP+C2PA: CPU ms (x) | XMP+C2PA: bytes added |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for side in (512, 1024):
        for fmt in FORMATS:
            raw = render("provenance bench", 1, side, side, fmt)
            cpu: dict[str, list[float]] = {name: [] for name in variants}
            size: dict[str, int] = {}
            for _ in range(args.rounds):
                for name, variant in variants.items():
                    seconds, data = finish_once(variant, raw, fmt, side)
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
