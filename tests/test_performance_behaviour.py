"""What the fast paths must keep doing, through real servers: untouched upstream bytes, one upstream call for
identical seeded requests in flight, a byte-bounded LRU of seeded results, 304s, and no cap below 64 calls at once.

Behaviour only; how fast it is lives in `bench/run.py`.
"""

import json
import random
import struct
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Server, post, post_raw, server_env, start_server, stop_server
from image_parts import coded_pixels

from components.image_codec import PNG_SIGNATURE
from image_generation_server.result_cache import ByteBudgetLRU

TEXT_CHUNKS = {b"tEXt", b"iTXt", b"zTXt"}
SLOW_UPSTREAM = 1.5  # seconds per upstream call: long enough for every concurrent request to arrive meanwhile
COALESCED = 16
IN_FLIGHT = 64  # the default IMAGE_GENERATION_MAX_CONCURRENCY
CACHE_PROMPT = "cache budget"
CACHE_SEEDS = (11, 12, 13)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, the whole chunk's bytes) for every chunk of a PNG, each CRC checked."""
    assert data.startswith(PNG_SIGNATURE)
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 12 + length
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        assert zlib.crc32(data[pos + 4 : end - 4]) == crc
        chunks.append((data[pos + 4 : pos + 8], data[pos:end]))
        pos = end
    assert chunks[-1][0] == b"IEND"
    return chunks


def without_text(png: bytes) -> bytes:
    """The PNG with its text chunks left out."""
    return PNG_SIGNATURE + b"".join(chunk for kind, chunk in png_chunks(png) if kind not in TEXT_CHUNKS)


def post_together(server: Server, bodies: list[dict]) -> list[tuple[int, dict[str, str], bytes]]:
    """POST every body at the same moment, one client thread each; the answers in order."""
    barrier = threading.Barrier(len(bodies))

    def one(body: dict) -> tuple[int, dict[str, str], bytes]:
        barrier.wait()
        return post(server, body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


@pytest.fixture(scope="module")
def servers(upstream, tmp_path_factory) -> Iterator[dict[str, Server]]:
    """Two servers, started side by side (starting is the slow part).

    `uncached`: the seeded-result cache disabled. `small_cache`: a cache that holds any two of the CACHE_SEEDS images
    but not all three. Its budget is the sum of the three images as the upstream sends them: the served images are
    larger (a text chunk is added, and the cache may count them in base64), so three never fit, and any two do.
    """
    budget = sum(len(upstream.image(CACHE_PROMPT, seed, 64, 64, "png")) for seed in CACHE_SEEDS)
    cache_bytes = {"uncached": "0", "small_cache": str(budget)}
    with ThreadPoolExecutor(len(cache_bytes)) as pool:
        starting = {
            name: pool.submit(
                start_server,
                tmp_path_factory.mktemp(name),
                server_env(IMAGE_GENERATION_ENDPOINT=upstream.url, IMAGE_GENERATION_CACHE_BYTES=value),
            )
            for name, value in cache_bytes.items()
        }
    try:
        yield {name: future.result() for name, future in starting.items()}  # a failed start raises here
    finally:
        for future in starting.values():
            if future.exception() is None:
                stop_server(future.result())


@pytest.fixture
def slow_upstream(fresh_upstream):
    """The fake upstream taking SLOW_UPSTREAM seconds per call."""
    fresh_upstream.latency = SLOW_UPSTREAM
    yield fresh_upstream
    fresh_upstream.latency = 0.0


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_upstream_bytes_go_out_untouched(server, fresh_upstream, fmt):
    status, headers, served = post(
        server, {"prompt": f"passthrough {fmt}", "width": 256, "height": 192, "seed": 31337, "output_format": fmt}
    )
    assert (status, headers["content-type"]) == (200, f"image/{fmt}")
    [seen] = fresh_upstream.requests
    params, sent_format = seen.payload["parameters"], seen.headers["accept"].removeprefix("image/")
    sent = fresh_upstream.image(seen.payload["inputs"], params["seed"], params["width"], params["height"], sent_format)
    assert coded_pixels(served, fmt) == coded_pixels(sent, fmt)  # only metadata was spliced in (our XMP)
    if fmt == "png":  # the XMP text chunk is the only change
        added = [chunk for kind, chunk in png_chunks(served) if kind in TEXT_CHUNKS]
        assert len(png_chunks(served)) == len(png_chunks(sent)) + 1
        assert len(added) == 1 and added[0][8:].startswith(b"XML:com.adobe.xmp\0")
        assert without_text(served) == without_text(sent)


def test_identical_seeded_requests_in_flight_share_one_upstream_call(servers, slow_upstream):
    body = {"prompt": "coalesced", "width": 64, "height": 64, "seed": 2024}
    answers = post_together(servers["uncached"], [body] * COALESCED)
    assert len(slow_upstream.requests) == 1
    assert [status for status, _, _ in answers] == [200] * COALESCED
    assert len({data for _, _, data in answers}) == 1
    assert len({headers["etag"] for _, headers, _ in answers}) == 1


def test_cache_bytes_zero_disables_the_cache(servers, fresh_upstream):
    body = {"prompt": "never cached", "width": 64, "height": 64, "seed": 5}
    first, again = post(servers["uncached"], body), post(servers["uncached"], body)
    assert len(fresh_upstream.requests) == 2
    assert first[0] == again[0] == 200
    assert first[2] == again[2]  # the same image, made twice


def test_cache_keeps_the_most_recently_used_seeds_within_its_byte_budget(servers, fresh_upstream):
    def fetch(seed: int) -> tuple[bytes, int]:
        """The image for `seed`, and how many upstream calls it took."""
        before = len(fresh_upstream.requests)
        status, _, data = post(
            servers["small_cache"], {"prompt": CACHE_PROMPT, "width": 64, "height": 64, "seed": seed}
        )
        assert status == 200
        return data, len(fresh_upstream.requests) - before

    a, b, c = CACHE_SEEDS
    made = {seed: fetch(seed) for seed in CACHE_SEEDS}  # c evicts a
    assert [calls for _, calls in made.values()] == [1, 1, 1]
    image = {seed: data for seed, (data, _) in made.items()}
    assert fetch(c) == (image[c], 0)
    assert fetch(b) == (image[b], 0)  # c is now the least recently used
    assert fetch(a) == (image[a], 1)  # made again; it evicts c
    assert fetch(b) == (image[b], 0)
    assert fetch(c) == (image[c], 1)


@pytest.mark.parametrize(
    ("if_none_match", "matches"),
    [
        ("{etag}", True),
        ("W/{etag}", True),
        ('"0123", {etag}', True),
        (' "a" ,W/{etag},"b"', True),
        ('"0123"', False),
        ('W/"0123", "4567"', False),
        ("{etag}x", False),
    ],
)
def test_if_none_match_answers_304_when_an_etag_matches(server, fresh_upstream, if_none_match, matches):
    body = json.dumps({"prompt": "etag forms", "width": 64, "height": 64, "seed": 7}).encode()
    _, headers, image = post_raw(server, body)
    status, again, data = post_raw(server, body, {"If-None-Match": if_none_match.format(etag=headers["etag"])})
    assert (again["etag"], again["x-seed"]) == (headers["etag"], headers["x-seed"])
    assert (status, data) == ((304, b"") if matches else (200, image))


def minor_faults(pid: int) -> int:
    """Page faults a process has taken that needed no disk (fresh memory, mostly): field 10 of /proc/<pid>/stat."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def test_image_buffers_reuse_memory_instead_of_faulting_in_new_pages(servers, fresh_upstream):
    """
    `allocator.py`: a 1024² request allocates and frees its 2 MB image several times over. With glibc's
    defaults each of those buffers was fresh memory, about 1,400 page faults per request; kept memory is reused.
    """
    server = servers["uncached"]
    body = {"prompt": "page faults", "width": 1024, "height": 1024}
    for _ in range(10):  # the first requests size the heap
        assert post(server, body)[0] == 200
    before = minor_faults(server.process.pid)
    for _ in range(40):
        assert post(server, body)[0] == 200
    assert (minor_faults(server.process.pid) - before) / 40 < 60


def test_64_unseeded_requests_are_upstream_at_once(server, slow_upstream):
    answers = post_together(server, [{"prompt": f"in flight {i}", "width": 64, "height": 64} for i in range(IN_FLIGHT)])
    assert [status for status, _, _ in answers] == [200] * IN_FLIGHT
    assert len(slow_upstream.requests) == IN_FLIGHT
    assert slow_upstream.max_in_flight == IN_FLIGHT


@pytest.mark.parametrize("seed", range(20))
def test_lru_never_holds_more_than_its_budget(seed):
    rng = random.Random(seed)
    budget = rng.choice([0, 1, 50, 100, 1000])
    cache: ByteBudgetLRU[tuple[int, int]] = ByteBudgetLRU(budget)
    for _ in range(200):
        key, size = rng.randrange(12), rng.randint(1, 300)
        cache.put(key, (key, size), size)
        assert cache.size_bytes <= budget
        stored = cache.get(key) == (key, size)
        assert stored == (size <= budget)
    held = [value for key in range(12) if (value := cache.get(key)) is not None]
    assert cache.size_bytes == sum(size for _, size in held)
    assert len(cache) == len(held)


def test_lru_evicts_the_least_recently_used_first():
    cache: ByteBudgetLRU[str] = ByteBudgetLRU(30)
    for key in "abc":
        cache.put(key, key.upper(), 10)
    cache.get("a")
    cache.put("d", "D", 10)
    assert [cache.get(key) for key in "abcd"] == ["A", None, "C", "D"]


def test_lru_does_not_store_an_item_larger_than_its_budget():
    cache: ByteBudgetLRU[str] = ByteBudgetLRU(100)
    cache.put("small", "s", 60)
    cache.put("huge", "h", 101)
    assert cache.get("huge") is None
    assert (cache.get("small"), cache.size_bytes, len(cache)) == ("s", 60, 1)
