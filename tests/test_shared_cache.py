"""The seeded-result cache shared through a real redis-server stays bounded: entries expire and the oldest go."""

import base64

import pytest
from haystack.dataclasses import ImageContent
from redis import Redis
from redis_server import RedisServer

from image_generation_server.shared_cache import MAX_ENTRIES, PREFIX, TTL_SECONDS, SharedResultCache


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def image(i: int) -> ImageContent:
    return ImageContent(base64_image=base64.b64encode(b"%d" % i).decode(), mime_type="image/png", meta={"seed": i},
                        validation=False)  # fmt: skip


async def test_the_shared_cache_keeps_at_most_its_bound_and_every_entry_expires(redis):
    cache = SharedResultCache(redis.url, "bounded")
    extra = 5
    for i in range(MAX_ENTRIES + extra):
        await cache.put(("prompt", i), image(i))
    await cache.client.aclose()

    store = Redis.from_url(redis.url)
    entries = [key for key in store.keys(f"{PREFIX}:bounded:*") if not key.endswith(b":index")]
    assert len(entries) == MAX_ENTRIES
    assert all(0 < store.ttl(key) <= TTL_SECONDS for key in entries)
    store.close()
    cache = SharedResultCache(redis.url, "bounded")
    assert await cache.get(("prompt", 0)) is None  # the oldest went first
    assert (await cache.get(("prompt", MAX_ENTRIES + extra - 1))).meta == {"seed": MAX_ENTRIES + extra - 1}
    await cache.client.aclose()
