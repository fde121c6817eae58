"""Benchmark: the server's latency, CPU, throughput and memory against the floor of calling the upstream directly.

Run from the repository root, with the `test` extra installed:

    python bench/run.py            # full run, about 5 minutes
    python bench/run.py --quick    # fewer requests, about 2 minutes

The fake upstream (`tests/fake_upstream.py`) runs as its own process; the server is a real `image-generation-server`
process started as the tests start it. The same run measures the code at `--baseline` (commit 780552f by default,
taken with `git archive` and served from the same environment), so that old and new are compared on the same
machine at the same time. With two cores or more, the server runs on core 0 (`taskset`) and this load generator and
the upstream on core 1, so that the server's CPU per request is its own. Every figure is printed as a table and
written to `bench/RESULTS.md`.
"""

import argparse
import asyncio
import datetime
import hashlib
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Server, server_env, start_server, stop_server  # noqa: E402
from fake_upstream import render  # noqa: E402
from test_load import rss_mb  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, photo"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- processes


@dataclass
class Upstream:
    """`tests/fake_upstream.py` in its own process."""

    process: subprocess.Popen
    url: str

    def stats(self, reset: bool = False) -> dict:
        return asyncio.run(_get_json(self.url, "/stats?reset=1" if reset else "/stats"))


@contextmanager
def upstream_process(latency: float, fmt: str) -> Iterator[Upstream]:
    command = [sys.executable, str(ROOT / "tests" / "fake_upstream.py"), "--latency", str(latency), "--format", fmt]
    process = subprocess.Popen([*command, "--variants", "8"], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield Upstream(process, process.stdout.readline().strip())
    finally:
        process.terminate()
        process.wait(10)


SERVER_CORE, LOAD_CORE = 0, 1
SIDE_BY_SIDE_BATCH = 100  # requests per server per round of `side_by_side_cpu`
PROCESSES_PER_CODE = 3  # server processes per code in `side_by_side_cpu`


@dataclass(frozen=True)
class Code:
    """A version of the server: this checkout, or an older commit extracted into `root`."""

    label: str
    root: Path | None = None  # None: this checkout, through its console script

    def command(self, pinned: bool) -> list[str] | None:
        pin = ["taskset", "-c", str(SERVER_CORE)] if pinned else []
        if self.root is None:
            return [*pin, str(Path(sys.executable).with_name("image-generation-server"))]
        # The HTTP package was components.server, then server, now image_generation_server.
        packages = [p for p in ("image_generation_server", "server") if (self.root / p / "app.py").exists()]
        entry = f"{packages[0]}.app" if packages else "components.server"
        return [*pin, sys.executable, "-c", f"from {entry} import main; main()"]

    def env(self) -> dict[str, str]:
        if self.root is None:
            return {}
        return {"HAYHOOKS_ADDITIONAL_PYTHON_PATH": str(self.root), "HAYHOOKS_PIPELINES_DIR": str(self.root / "served")}


def extract(commit: str, tmp: Path) -> Code:
    """The tree of `commit`, written to a folder of `tmp`."""
    root = tmp / commit
    root.mkdir()
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return Code(commit, root)


def pin_load_generator() -> bool:
    """Move this process (and the upstream it starts) to core 1 when the server can have core 0 to itself."""
    if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
        return False
    os.sched_setaffinity(0, {LOAD_CORE})
    return True


@contextmanager
def server_process(upstream: Upstream, tmp: Path, code: Code, pinned: bool, **env: str) -> Iterator[Server]:
    environment = server_env(IMAGE_GENERATION_ENDPOINT=upstream.url, **code.env(), **env)
    server = start_server(tmp, environment, command=code.command(pinned), cwd=code.root or ROOT)
    try:
        yield server
    finally:
        stop_server(server)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ---------------------------------------------------------------- a minimal keep-alive HTTP/1.1 client


class Connection:
    """One keep-alive connection; as little client CPU per request as asyncio allows, so the floor stays honest."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"", headers: str = "") -> tuple[int, dict, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=2**20)
        assert self._reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
        self._writer.write(head.encode() + body)
        raw = await self._reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        response_headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
        length = int(response_headers.get("content-length", "0"))
        data = await self._reader.readexactly(length) if length else b""
        if response_headers.get("connection", "").lower() == "close":
            await self.close()
        return status, response_headers, data

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


async def _get_json(url: str, path: str) -> dict:
    conn = Connection(url)
    try:
        return json.loads((await conn.request("GET", path))[2])
    finally:
        await conn.close()


@dataclass(frozen=True)
class Target:
    """Where a request goes: our server's route, or the upstream itself with the body our server would send."""

    url: str
    direct: bool

    def request(self, size: int, seed: int | None) -> tuple[str, bytes, str]:
        if self.direct:
            seed = seed if seed is not None else secrets.randbelow(2**32)
            payload = {"inputs": PROMPT, "parameters": {"height": size, "width": size, "seed": seed}}
            return "/", json.dumps(payload).encode(), "Content-Type: application/json\r\nAccept: image/png\r\n"
        body: dict = {"prompt": PROMPT, "width": size, "height": size}
        if seed is not None:
            body["seed"] = seed
        return "/image_generation/run", json.dumps(body).encode(), "Content-Type: application/json\r\n"


async def _one(conn: Connection, target: Target, size: int, seed: int | None) -> float:
    path, body, headers = target.request(size, seed)
    started = time.perf_counter()
    status, _, data = await conn.request("POST", path, body, headers)
    elapsed = time.perf_counter() - started
    if status != 200 or not (target.direct or data.startswith(b"\x89PNG")):
        raise RuntimeError(f"{target.url}{path} answered {status}: {data[:200]!r}")
    return elapsed


async def sequential(target: Target, size: int, count: int, seed: int | None = None) -> list[float]:
    """`count` requests one after another on one connection; their latencies in seconds."""
    conn = Connection(target.url)
    try:
        return [await _one(conn, target, size, seed) for _ in range(count)]
    finally:
        await conn.close()


async def concurrent(target: Target, size: int, clients: int, *, seconds: float = 0, total: int = 0) -> float:
    """`clients` loops for `seconds` (or until `total` requests are done); completed requests per second."""
    return (await concurrent_count(target, size, clients, seconds=seconds, total=total))[0]


async def concurrent_count(
    target: Target, size: int, clients: int, *, seconds: float = 0, total: int = 0
) -> tuple[float, int]:
    """Like `concurrent`; also returns the number of requests completed."""
    done = claimed = 0
    stop = time.perf_counter() + seconds if seconds else float("inf")

    async def client() -> None:
        nonlocal done, claimed
        conn = Connection(target.url)
        try:
            while time.perf_counter() < stop and (not total or claimed < total):
                claimed += 1
                await _one(conn, target, size, None)
                done += 1
        finally:
            await conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.perf_counter() - started), done


def warm_upstream(upstream: Upstream, sizes: tuple[int, ...]) -> None:
    """Ask the upstream once for each of its 8 image variants, so that it serves them from memory from now on."""
    seeds = {}
    for seed in range(1000):
        seeds.setdefault(int(hashlib.sha256(f"{PROMPT}\0{seed}".encode()).hexdigest(), 16) % 8, seed)
        if len(seeds) == 8:
            break
    direct = Target(upstream.url, direct=True)
    for size in sizes:
        for seed in seeds.values():
            asyncio.run(sequential(direct, size, 1, seed))


# ---------------------------------------------------------------- measurements


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Row:
    what: str
    floor: str
    server: str
    target: str
    baseline: str
    ratio: str
    ok: bool | None = None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *args: object, ok: bool | None = None) -> None:
        self.rows.append(Row(*(str(a) for a in args), ok=ok))  # type: ignore[arg-type]
        print(f"  {self.rows[-1].what}: server {self.rows[-1].server} (floor {self.rows[-1].floor})", flush=True)

    def markdown(self) -> str:
        out = ["| figure | floor (direct upstream) | server | target | baseline | ratio vs floor | met |",
               "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in self.rows:
            met = "" if r.ok is None else ("yes" if r.ok else "**no**")
            out.append(f"| {r.what} | {r.floor} | {r.server} | {r.target} | {r.baseline} | {r.ratio} | {met} |")
        return "\n".join(out)


def ms(values: list[float], q: float = 0.5) -> float:
    """The `q` quantile of latencies in seconds, in milliseconds."""
    return pct(values, q) * 1000


def latency_phase(report: Report, tmp: Path, n: int, cache_repeats: int, code: Code, pinned: bool) -> None:
    """Sequential latency and CPU per request at 512² and 1024², and the cache hit."""
    print(f"[{code.label}] latency: PNG upstream, no added latency, one client", flush=True)
    floors: dict[int, list[float]] = {}
    with upstream_process(0.0, "png") as upstream, server_process(upstream, tmp, code, pinned) as server:
        warm_upstream(upstream, (512, 1024))
        direct, ours = Target(upstream.url, direct=True), Target(server.url, direct=False)
        for size, count in ((512, n), (1024, max(20, n // 2))):
            asyncio.run(sequential(ours, size, 10))  # warm the server's connection pool and code paths
            floor = floors[size] = asyncio.run(sequential(direct, size, count))
            up_cpu = cpu_seconds(upstream.process.pid)
            cpu = cpu_seconds(server.process.pid)
            lat = asyncio.run(sequential(ours, size, count))
            cpu_ms = (cpu_seconds(server.process.pid) - cpu) * 1000 / count
            up_cpu_ms = (cpu_seconds(upstream.process.pid) - up_cpu) * 1000 / count
            added = ms(lat) - ms(floor)
            what = f"[{code.label}] {size}² PNG→PNG"
            report.add(f"{what} p50 latency (server CPU per request)", f"{ms(floor):.1f} ms",
                       f"{ms(lat):.1f} ms ({cpu_ms:.1f} ms CPU)", "", "", f"{ms(lat) / ms(floor):.2f}x")  # fmt: skip
            limit = 5 if size == 512 else 10
            report.add(f"{what} added latency (p50 - floor p50)", "0 ms", f"{added:.1f} ms", f"≤ {limit} ms", "", "",
                       ok=added <= limit)  # fmt: skip
            report.add(f"{what} p99 latency", f"{ms(floor, 0.99):.1f} ms", f"{ms(lat, 0.99):.1f} ms", "", "",
                       f"{ms(lat, 0.99) / ms(floor, 0.99):.2f}x")  # fmt: skip
            report.add(f"{what} CPU per request (floor: upstream's CPU)", f"{up_cpu_ms:.1f} ms", f"{cpu_ms:.1f} ms",
                       "", "", "")  # fmt: skip

        print(f"[{code.label}] cache hit: a seeded request repeated", flush=True)
        seed = 4242
        asyncio.run(sequential(ours, 512, 1, seed))
        cpu = cpu_seconds(server.process.pid)
        hits = asyncio.run(sequential(ours, 512, cache_repeats, seed))
        cpu_ms = (cpu_seconds(server.process.pid) - cpu) * 1000 / cache_repeats
        floor = floors[512]
        report.add(f"[{code.label}] 512² cache-hit p50 latency (CPU per request)", f"{ms(floor):.1f} ms",
                   f"{ms(hits):.1f} ms ({cpu_ms:.1f} ms CPU)", "≤ 3 ms", "", f"{ms(hits) / ms(floor):.2f}x",
                   ok=ms(hits) <= 3)  # fmt: skip


def default_reencode_cpu_ms(jpeg: bytes, reps: int) -> float:
    """CPU of what the baseline did with a JPEG: decode it and `Image.save(format="PNG")` at PIL's defaults."""
    started = time.process_time()
    for _ in range(reps):
        with Image.open(BytesIO(jpeg)) as image:
            image.save(BytesIO(), format="PNG")
    return (time.process_time() - started) * 1000 / reps


def jpeg_phase(report: Report, tmp: Path, n: int, code: Code, pinned: bool) -> None:
    print(f"[{code.label}] JPEG upstream → PNG at 1024²", flush=True)
    reference = default_reencode_cpu_ms(render(PROMPT, 0, 1024, 1024, "jpeg"), max(3, n // 10))
    with upstream_process(0.0, "jpeg") as upstream, server_process(upstream, tmp, code, pinned) as server:
        warm_upstream(upstream, (1024,))
        ours = Target(server.url, direct=False)
        asyncio.run(sequential(ours, 1024, 5))
        cpu = cpu_seconds(server.process.pid)
        lat = asyncio.run(sequential(ours, 1024, n))
        cpu_ms = (cpu_seconds(server.process.pid) - cpu) * 1000 / n
    ratio = cpu_ms / reference
    what = f"[{code.label}] 1024² JPEG→PNG"
    report.add(f"{what} CPU per request (floor: PIL default decode+save)", f"{reference:.0f} ms", f"{cpu_ms:.0f} ms",
               "≤ 0.3x", "1.0x", f"{ratio:.2f}x", ok=ratio <= 0.3)  # fmt: skip
    report.add(f"{what} p50 latency", "", f"{ms(lat):.0f} ms", "", "", "")


def throughput_phase(report: Report, tmp: Path, seconds: float, rss_requests: int, code: Code, pinned: bool) -> dict:
    """Requests per second at 16 and 64 clients against the floor, and memory growth; returns the CPU per request."""
    print(f"[{code.label}] throughput: upstream latency 300 ms, 512², cache off", flush=True)
    figures = {}
    with (
        upstream_process(0.3, "png") as upstream,
        server_process(upstream, tmp, code, pinned, IMAGE_GENERATION_CACHE_BYTES="0") as server,
    ):
        warm_upstream(upstream, (512,))
        direct, ours = Target(upstream.url, direct=True), Target(server.url, direct=False)
        asyncio.run(sequential(ours, 512, 2))
        rss_idle = rss_mb(server.process.pid)
        # 64 requests at once hold 64 images, connections and buffers: that working set is not a leak, so growth is
        # measured from after a first 64-client round.
        asyncio.run(concurrent(ours, 512, 64, total=4 * 64))
        rss_warm = rss_mb(server.process.pid)
        asyncio.run(concurrent(ours, 512, 64, total=rss_requests))
        rss_after = rss_mb(server.process.pid)
        peak = 0
        for clients, target in ((16, ""), (64, "≥ 0.85x")):
            floor = asyncio.run(concurrent(direct, 512, clients, seconds=seconds))
            upstream.stats(reset=True)
            cpu = cpu_seconds(server.process.pid)
            rate, done = asyncio.run(concurrent_count(ours, 512, clients, seconds=seconds))
            cpu_ms = (cpu_seconds(server.process.pid) - cpu) * 1000 / max(1, done)
            peak = upstream.stats()["max_in_flight"]
            figures[f"cpu_rate{clients}"] = cpu_ms
            report.add(f"[{code.label}] throughput, {clients} clients (server CPU per request)", f"{floor:.0f} req/s",
                       f"{rate:.0f} req/s ({cpu_ms:.1f} ms CPU)", target, "", f"{rate / floor:.2f}x",
                       ok=rate / floor >= 0.85 if target else None)  # fmt: skip
        report.add(f"[{code.label}] upstream calls in flight, 64 clients", "64", str(peak), "64", "",
                   f"{peak / 64:.2f}x", ok=peak >= 64)  # fmt: skip
    report.add(f"[{code.label}] server RSS idle → after a first 64-client round, cache off", "",
               f"{rss_idle:.0f} → {rss_warm:.0f} MB (+{rss_warm - rss_idle:.0f})", "", "", "")  # fmt: skip
    growth = rss_after - rss_warm
    report.add(f"[{code.label}] server RSS growth over {rss_requests} more requests, cache off", "",
               f"{rss_warm:.0f} → {rss_after:.0f} MB (+{growth:.0f})", "≤ +30 MB", "", "", ok=growth <= 30)  # fmt: skip
    return figures


def side_by_side_cpu(tmp: Path, codes: list[Code], rounds: int, pinned: bool) -> dict[str, dict]:
    """
    CPU per request of each code at 512² and 1024², its servers up at once and measured in turns.

    Each round sends `SIDE_BY_SIDE_BATCH` sequential requests to each server in turn, so that whatever else slows the
    machine during the run slows every code alike; the CPU of all rounds is summed per code. Each code runs as
    `PROCESSES_PER_CODE` server processes: one process's own layout (its hash seed, its addresses) moves its CPU per
    request by several percent, the same code against itself included. `spread{size}` is the largest ratio between
    two processes of the same code: differences below it are noise.
    """
    print("side by side: CPU per request, servers measured in turns", flush=True)
    figures: dict[str, dict] = {code.label: {} for code in codes}
    with upstream_process(0.0, "png") as upstream, ExitStack() as stack:
        servers = [
            (code, stack.enter_context(server_process(upstream, tmp, code, pinned)))
            for _ in range(PROCESSES_PER_CODE)
            for code in codes
        ]
        for size in (512, 1024):
            warm_upstream(upstream, (size,))
            targets = [Target(server.url, direct=False) for _, server in servers]
            for target in targets:
                asyncio.run(sequential(target, size, 20))
            spent = [0.0] * len(servers)
            for _ in range(rounds):
                for i, ((_, server), target) in enumerate(zip(servers, targets, strict=True)):
                    cpu = cpu_seconds(server.process.pid)
                    asyncio.run(sequential(target, size, SIDE_BY_SIDE_BATCH))
                    spent[i] += cpu_seconds(server.process.pid) - cpu
            for code in codes:
                mine = [seconds for (owner, _), seconds in zip(servers, spent, strict=True) if owner is code]
                figures[code.label][f"cpu{size}"] = sum(mine) * 1000 / (len(mine) * rounds * SIDE_BY_SIDE_BATCH)
                figures[code.label][f"spread{size}"] = max(mine) / min(mine)
    return figures


def compare(report: Report, new: dict, old: dict, baseline: str, max_ratio: float) -> None:
    """This code's CPU per request against the baseline's, measured in the same run, and the noise between processes."""
    for key, what, target in (
        ("cpu512", "512² CPU per request, sequential, side by side", max_ratio),
        ("cpu1024", "1024² CPU per request, sequential, side by side", max_ratio),
        ("cpu_rate64", "512² CPU per request, 64 clients", None),
    ):
        ratio = new[key] / old[key]
        report.add(f"{what}: this code vs {baseline}", "", f"{new[key]:.1f} ms", f"≤ {target}x" if target else "",
                   f"{old[key]:.1f} ms", f"{ratio:.2f}x", ok=ratio <= target if target else None)  # fmt: skip
    for size in (512, 1024):
        spread = max(new[f"spread{size}"], old[f"spread{size}"])
        report.add(f"{size}² CPU per request: largest ratio between {PROCESSES_PER_CODE} processes of the same code",
                   "", f"{spread:.2f}x", "", "", "")  # fmt: skip


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark the image server against the upstream it calls.")
    parser.add_argument("--quick", action="store_true", help="fewer requests (about 1 minute)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--baseline", default="780552f", help="the commit to measure beside this code")
    parser.add_argument(
        "--max-ratio", type=float, default=0.5, help="the target for this code's sequential CPU per request over the "
        "baseline's (0.5 against the default baseline; issue 21 asks 1.05 against 606eceb)",
    )  # fmt: skip
    args = parser.parse_args()
    n, seconds, rss_requests, rounds = (40, 3.0, 500, 3) if args.quick else (200, 8.0, 2000, 8)
    report = Report()
    started = time.monotonic()
    pinned = pin_load_generator()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        figures = {}
        codes = [extract(args.baseline, tmp), Code("this")]
        for code in codes:
            latency_phase(report, tmp, n, n, code, pinned)
            jpeg_phase(report, tmp, max(10, n // 4), code, pinned)
            figures[code.label] = throughput_phase(report, tmp, seconds, rss_requests, code, pinned)
        for label, cpu in side_by_side_cpu(tmp, codes, rounds, pinned).items():
            figures[label] |= cpu
        compare(report, figures["this"], figures[args.baseline], args.baseline, args.max_ratio)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mode = "quick" if args.quick else "full"
    placement = f"server on core {SERVER_CORE}, load and upstream on core {LOAD_CORE}" if pinned else "not pinned"
    header = f"Benchmark ({mode} run) {stamp} on {machine()}, {placement}; took {time.monotonic() - started:.0f} s."
    table = report.markdown()
    print(f"\n{header}\n\n{table}")
    if not args.no_write:
        command = "python bench/run.py" + (" --quick" if args.quick else "") + f" --baseline {args.baseline}"
        command += f" --max-ratio {args.max_ratio:g}"
        text = f"# Benchmark results\n\n{header}\n\nCommand: `{command}`\n\n{table}\n"
        (ROOT / "bench" / "RESULTS.md").write_text(text)


if __name__ == "__main__":
    main()
