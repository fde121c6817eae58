"""Benchmark of the local backend: `DiffusersTextToImage` against the same diffusers pipeline called directly.

Run from the repository root, with the `local` extra installed:

    python bench/local_backend.py            # about 2 minutes on 2 CPU cores

It builds the tiny random-weight Stable Diffusion model of `scripts/tiny_diffusers.py` in a temp dir, then:
- times the component and a direct `pipeline(...)` call alternately, same size, steps and seed, on the CPU;
- runs 200 more requests through the component (cache off) and reports RSS before and after, and how many copies
  of the weights the process holds.
The table is printed and written to `bench/RESULTS-local.md`.
"""

import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoPipelineForText2Image
from haystack.utils import ComponentDevice

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from tiny_diffusers import build  # noqa: E402

from components.diffusers_text_to_image import DiffusersTextToImage  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, photo"


def rss_mb() -> float:
    """Resident memory of this process now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def overhead(model: Path, size: int, steps: int, rounds: int) -> tuple[float, float, float]:
    """Median seconds per image of a direct diffusers call and of the component, and the median of the per-round
    ratios; the two run back to back in each round, first one then the other, so that drift cancels out."""
    pipeline = AutoPipelineForText2Image.from_pretrained(str(model), dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    component = DiffusersTextToImage(
        model=str(model), device=ComponentDevice.from_str("cpu"), num_inference_steps=steps
    )
    component.warm_up()

    def direct(seed: int) -> None:
        generator = torch.Generator("cpu").manual_seed(seed)
        pipeline(PROMPT, width=size, height=size, num_inference_steps=steps, generator=generator).images[0]

    def ours(seed: int) -> None:
        component.run(prompt=PROMPT, width=size, height=size, seed=seed)

    def timed(call, seed: int) -> float:
        started = time.perf_counter()
        call(seed)
        return time.perf_counter() - started

    direct(0), ours(0)  # warm-up
    times: dict[str, list[float]] = {"direct": [], "ours": []}
    for seed in range(rounds):
        order = (("direct", direct), ("ours", ours)) if seed % 2 else (("ours", ours), ("direct", direct))
        for name, call in order:
            times[name].append(timed(call, seed))
    ratios = [o / d for o, d in zip(times["ours"], times["direct"], strict=True)]
    return statistics.median(times["direct"]), statistics.median(times["ours"]), statistics.median(ratios)


def memory(model: Path, requests: int) -> tuple[float, float, int]:
    """RSS (MB) after 20 warm-up requests and after `requests` more, and the number of weight copies held."""
    cpu = ComponentDevice.from_str("cpu")
    components = [DiffusersTextToImage(model=str(model), device=cpu, num_inference_steps=2)
                  for _ in range(2)]  # fmt: skip
    for component in components:
        component.warm_up()
    for seed in range(20):
        components[seed % 2].run(prompt=PROMPT, width=64, height=64, seed=seed)
    before = rss_mb()
    for seed in range(requests):
        components[seed % 2].run(prompt=PROMPT, width=64, height=64, seed=seed)
    return before, rss_mb(), len({id(c._loaded.pipeline) for c in components})


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS-local.md alone")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="bench-local-") as tmp:
        model = build(Path(tmp) / "tiny-sd")
        direct, ours, ratio = overhead(model, args.size, args.steps, args.rounds)
        before, after, copies = memory(model, args.requests)
    added = (ratio - 1) * 100
    rows = [
        ("figure", "direct diffusers", "DiffusersTextToImage", "target", "met"),
        ("---",) * 5,
        (f"wall time per image, {args.size}², {args.steps} steps, CPU (median of {args.rounds})",
         f"{direct * 1000:.0f} ms", f"{ours * 1000:.0f} ms ({added:+.1f}%, median of paired ratios)", "≤ +3%",
         met(added <= 3)),
        (f"RSS before → after {args.requests} requests (64², cache off)", "",
         f"{before:.0f} → {after:.0f} MB ({after - before:+.0f})", "flat", met(after - before <= 30)),
        ("copies of the weights in the process (2 components)", "", str(copies), "1", met(copies == 1)),
    ]  # fmt: skip
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"Local backend benchmark {stamp} on {platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}, tiny random-weight SD model.")  # fmt: skip
    print(f"{header}\n\n{table}")
    if not args.no_write:
        text = f"# Local backend benchmark\n\n{header}\n\nCommand: `python bench/local_backend.py`\n\n{table}\n"
        (ROOT / "bench" / "RESULTS-local.md").write_text(text)


if __name__ == "__main__":
    main()
