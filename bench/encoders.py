"""Encoder study: PNG encoders on photo-like 1024² pixels (a decoded JPEG, what the server converts), time and size.

    python bench/encoders.py

Optional candidates are measured when importable and listed as missing otherwise; to include them:
`pip install imagecodecs pyspng-seunglab fpng` (into a scratch environment: none is a dependency of the project).
Every output is decoded back with PIL and checked to hold exactly the input pixels.
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

from PIL import Image, features

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fake_upstream import render


def pil(level: int | None) -> Callable[[Image.Image], bytes]:
    def encode(image: Image.Image) -> bytes:
        out = BytesIO()
        image.save(out, format="PNG", **({} if level is None else {"compress_level": level}))
        return out.getvalue()

    return encode


def candidates() -> tuple[dict[str, Callable[[Image.Image], bytes]], list[str]]:
    zlib = (
        f"zlib-ng {features.version_feature('zlib_ng')}"
        if features.check_feature("zlib_ng")
        else f"zlib {features.version_codec('zlib')}"
    )
    found: dict[str, Callable[[Image.Image], bytes]] = {f"PIL default (level 6, {zlib})": pil(None)}
    found.update({f"PIL compress_level={level}": pil(level) for level in range(1, 10)})
    missing = []
    try:
        import imagecodecs  # noqa: PLC0415 (optional)
        import numpy as np  # noqa: PLC0415 (optional)

        found["imagecodecs.png_encode level=1 (libpng)"] = lambda im: imagecodecs.png_encode(np.asarray(im), level=1)
        found["imagecodecs.png_encode OpenCV-fast (level 1, RLE, SUB)"] = lambda im: imagecodecs.png_encode(
            np.asarray(im), level=1, strategy=3, filter=16
        )
        found["imagecodecs.spng_encode level=1"] = lambda im: imagecodecs.spng_encode(np.asarray(im), level=1)
        found["imagecodecs.spng_encode default"] = lambda im: imagecodecs.spng_encode(np.asarray(im))
    except ImportError:
        missing.append("imagecodecs")
    try:
        import numpy as np  # noqa: PLC0415 (optional)
        import pyspng  # noqa: PLC0415 (optional)

        found["pyspng.encode compress_level=1"] = lambda im: pyspng.encode(np.asarray(im), compress_level=1)
        found["pyspng.encode compress_level=6"] = lambda im: pyspng.encode(np.asarray(im), compress_level=6)
    except ImportError:
        missing.append("pyspng-seunglab")
    try:
        import fpng  # noqa: PLC0415 (optional)

        found["fpng (fpng.from_pil)"] = fpng.from_pil
    except ImportError:
        missing.append("fpng")
    return found, missing


def main() -> None:
    parser = argparse.ArgumentParser(description="Compare PNG encoders on photo-like 1024² content.")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    jpeg = render("a lighthouse on a cliff at dusk, photo", 7, args.size, args.size, "jpeg")
    started = time.perf_counter()
    image = Image.open(BytesIO(jpeg))
    image.load()
    decode_ms = (time.perf_counter() - started) * 1000
    pixels = image.tobytes()
    encoders, missing = candidates()
    rows = []
    for name, encode in encoders.items():
        times = []
        for _ in range(args.reps):
            started = time.perf_counter()
            data = encode(image)
            times.append((time.perf_counter() - started) * 1000)
        with Image.open(BytesIO(data)) as check:
            lossless = check.convert("RGB").tobytes() == pixels
        rows.append((name, statistics.median(times), len(data), lossless))
    base_ms, base_size = rows[0][1], rows[0][2]
    print(f"PNG encoders on a decoded {args.size}² photo-like JPEG ({len(jpeg) / 1024:.0f} KB; PIL decode "
          f"{decode_ms:.0f} ms), median of {args.reps}:\n")  # fmt: skip
    print("| encoder | encode ms | size KB | time vs default | size vs default | lossless |")
    print("|---|---|---|---|---|---|")
    for name, ms, size, lossless in rows:
        print(f"| {name} | {ms:.1f} | {size / 1024:.0f} | {ms / base_ms:.2f}x | {size / base_size:.2f}x | "
              f"{'yes' if lossless else 'NO'} |")  # fmt: skip
    if missing:
        print(f"\nnot installed, not measured: {', '.join(missing)}")


if __name__ == "__main__":
    main()
