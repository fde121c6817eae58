"""
The second level of the seeded-result cache: Redis, shared by every replica.

A seeded repeat made on one replica is then a hit on another. Bounded: entries expire after `TTL_SECONDS`, at most
`MAX_ENTRIES` are kept (the oldest go first), and an image over `MAX_ENTRY_BYTES` is not shared. Best effort: when
Redis is slow or away, a lookup is a miss and a store is skipped.
"""

import hashlib
import json
import time

from haystack import logging
from haystack.dataclasses import ImageContent
from redis.asyncio import Redis

logger = logging.getLogger(__name__)

PREFIX = "image-generation:cache"
TTL_SECONDS = 3600
MAX_ENTRIES = 256
MAX_ENTRY_BYTES = 16 * 1024 * 1024
TIMEOUT_SECONDS = 2.0


class SharedResultCache:
    """Seeded results in Redis under `image-generation:cache:{namespace}:*`, with an index that bounds their count."""

    def __init__(self, url: str, namespace: str) -> None:
        """Connect lazily to the Redis at `url`; `namespace` keeps apart what different pipelines make."""
        self.client = Redis.from_url(url, socket_timeout=TIMEOUT_SECONDS, socket_connect_timeout=TIMEOUT_SECONDS)
        self.prefix = f"{PREFIX}:{namespace}"
        self.index = f"{self.prefix}:index"

    def _name(self, key: tuple) -> str:
        return hashlib.sha256(repr(key).encode()).hexdigest()

    async def get(self, key: tuple) -> ImageContent | None:
        """The image stored under `key`, or None (also when Redis fails)."""
        try:
            raw = await self.client.get(f"{self.prefix}:{self._name(key)}")
        except Exception as e:  # any Redis failure is a miss
            logger.debug("Shared cache lookup failed: {error}", error=type(e).__name__)
            return None
        if raw is None:
            return None
        stored = json.loads(raw)
        return ImageContent(
            base64_image=stored["base64_image"], mime_type=stored["mime_type"], meta=stored["meta"], validation=False
        )

    async def put(self, key: tuple, image: ImageContent) -> None:
        """Store `image` under `key` for `TTL_SECONDS`, dropping the oldest entries beyond `MAX_ENTRIES`."""
        value = json.dumps({"base64_image": image.base64_image, "mime_type": image.mime_type, "meta": image.meta})
        if len(value) > MAX_ENTRY_BYTES:
            return
        name, now = self._name(key), time.time()
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(f"{self.prefix}:{name}", value, ex=TTL_SECONDS)
                pipe.zadd(self.index, {name: now})
                pipe.zremrangebyscore(self.index, "-inf", now - TTL_SECONDS)
                pipe.zcard(self.index)
                *_, count = await pipe.execute()
            if count > MAX_ENTRIES:
                oldest = await self.client.zpopmin(self.index, count - MAX_ENTRIES)
                await self.client.delete(*(f"{self.prefix}:{member.decode()}" for member, _ in oldest))
        except Exception as e:  # sharing is best effort
            logger.debug("Shared cache store failed: {error}", error=type(e).__name__)
