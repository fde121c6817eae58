"""Load: many clients against a slow upstream; every answer is an image or a 503, and the server stays healthy.

CI holds 200 clients for LOAD_SECONDS (10 s by default); `LOAD_SECONDS=60 pytest tests/test_load.py` is the long run.
"""

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import httpx2
import pytest
from conftest import server_env, start_server, stop_server

CLIENTS = 200
SECONDS = float(os.environ.get("LOAD_SECONDS", "10"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def hammer(url: str, seconds: float, pid: int) -> tuple[Counter, list[str], float, float]:
    """CLIENTS loops posting unseeded requests; a watcher polls /status and the server's RSS.

    Returns the answers by status, the bad answers, the slowest /status in seconds and the peak RSS in MB.
    """
    statuses: Counter = Counter()
    bad: list[str] = []
    status_times: list[float] = []
    rss: list[float] = [rss_mb(pid)]
    stop = time.monotonic() + seconds
    limits = httpx2.Limits(max_connections=CLIENTS + 10)
    async with httpx2.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one_client(i: int) -> None:
            while time.monotonic() < stop:
                r = await client.post("/image_generation/run", json={"prompt": f"load {i}", "width": 64, "height": 64})
                statuses[r.status_code] += 1
                if r.status_code == 200 and not r.content.startswith(b"\x89PNG"):
                    bad.append("200 without a PNG")
                elif r.status_code == 503 and not r.headers.get("retry-after"):
                    bad.append("503 without Retry-After")
                elif r.status_code == 503:
                    await asyncio.sleep(0.05)

        async def watch_status() -> None:
            while time.monotonic() < stop:
                started = time.monotonic()
                r = await client.get("/status")
                status_times.append(time.monotonic() - started)
                rss.append(rss_mb(pid))
                assert r.status_code == 200
                await asyncio.sleep(0.25)

        await asyncio.gather(watch_status(), *(one_client(i) for i in range(CLIENTS)))
    return statuses, bad, max(status_times), max(rss)


@pytest.mark.slow
def test_200_clients_get_images_or_503(upstream, tmp_path):
    env = server_env(
        IMAGE_GENERATION_ENDPOINT=upstream.url,
        IMAGE_GENERATION_MAX_CONCURRENCY="32",
        IMAGE_GENERATION_MAX_QUEUE="64",
        IMAGE_GENERATION_CACHE_BYTES="0",
        HAYHOOKS_LOG_LEVEL="WARNING",
    )
    server = start_server(tmp_path, env)
    upstream.faults.clear()
    upstream.max_in_flight = 0
    upstream.latency = 0.3
    try:
        asyncio.run(hammer(server.url, 2, server.process.pid))  # warm-up
        rss_before = rss_mb(server.process.pid)
        statuses, bad, slowest_status, rss_peak = asyncio.run(hammer(server.url, SECONDS, server.process.pid))
        rss_after = rss_mb(server.process.pid)
    finally:
        upstream.latency = 0.0
        stop_server(server)

    print(f"\nload: {statuses.total()} requests in {SECONDS:.0f} s, by status {dict(statuses)}; server RSS "
          f"{rss_before:.0f} MB before, {rss_peak:.0f} MB peak, {rss_after:.0f} MB after; slowest /status "
          f"{slowest_status * 1000:.0f} ms")  # fmt: skip
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] > 0 and statuses[503] > 0  # the cap was reached and work still got done
    assert bad == []
    assert slowest_status < 2.0
    assert rss_peak - rss_before < 50
    assert upstream.max_in_flight <= 32
