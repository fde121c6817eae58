"""
Per-key request quotas: `IMAGE_GENERATION_RATE_LIMIT` requests per window for each API key, or client address.

With API keys off, each client address has its own quota: the address the connection comes from, or the one a trusted
proxy forwards (`IMAGE_GENERATION_TRUSTED_PROXIES`; none by default, so that a forged `X-Forwarded-For` changes
nothing). An address is validated before it names a quota: anything that is not an IP address counts as `unknown`, and
an IPv6 address counts as its /64 (one subscriber's network), so that no header value becomes a key of its own.

Counts live in Redis when `HAYHOOKS_DURABLE_REDIS_URL` is set, so that replicas share them, else in this process.
Windows are fixed and aligned to the clock (a minute starts at :00), so that every replica agrees on them.

Every answer carries OpenAI's headers: `x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests` and
`x-ratelimit-reset-requests` (the time until the window ends, such as `12s`). Past the limit the answer is 429 with
`Retry-After`. When Redis cannot be reached, the request goes through (fail open), with a warning in the log and
`image_generation_quota_store_errors_total` counted, and only the limit header is sent.
"""

import ipaddress
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from hayhooks import log
from prometheus_client import Counter
from redis import asyncio as redis
from redis.exceptions import RedisError
from starlette.types import Message, Send

RATE_LIMIT_ENV = "IMAGE_GENERATION_RATE_LIMIT"
IDENTITY_SCOPE_KEY = "image_generation.identity"  # where `HTTPGuard` leaves the request's `identity` for the doors
IPV6_SUBSCRIBER_PREFIX = 64  # one IPv6 client is its /64: a subscriber gets at least that many addresses
REDIS_URL_ENV = "HAYHOOKS_DURABLE_REDIS_URL"
PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
MAX_MEMORY_IDENTITIES = 65536  # the in-process counter forgets the least recently seen beyond this
REDIS_TIMEOUT = 0.5  # seconds a quota check may wait for Redis before failing open
REDIS_KEY_PREFIX = "image-generation:quota"
WARNING_INTERVAL = 60.0  # seconds between two warnings that Redis is unreachable

STORE_ERRORS = Counter(
    "image_generation_quota_store_errors", "Quota checks let through because the quota store could not be reached"
)


@dataclass(frozen=True)
class RateLimit:
    """At most `requests` per `period` seconds."""

    requests: int
    period: int

    @classmethod
    def parse(cls, raw: str) -> "RateLimit":
        """`<count>/<second|minute|hour|day>`, such as `60/minute`."""
        count, _, unit = raw.strip().partition("/")
        if not count.strip().isdigit() or int(count) < 1 or unit.strip().lower() not in PERIODS:
            raise ValueError(f"{RATE_LIMIT_ENV}={raw!r} must look like 60/minute (second, minute, hour or day)")
        return cls(int(count), PERIODS[unit.strip().lower()])


class Counts(Protocol):
    """Where the requests of each identity in each window are counted."""

    async def hit(self, identity: str, window: int, ttl: int) -> int:
        """Count one request of `identity` in `window`; returns its count so far, this one included."""
        ...


class MemoryCounts:
    """Counts in this process, for at most `MAX_MEMORY_IDENTITIES` identities (the least recently seen go first)."""

    def __init__(self, max_identities: int = MAX_MEMORY_IDENTITIES) -> None:
        self.max_identities = max_identities
        self._counts: OrderedDict[str, tuple[int, int]] = OrderedDict()

    async def hit(self, identity: str, window: int, ttl: int) -> int:
        """Count one request (the event loop is the only writer: no lock)."""
        seen_window, count = self._counts.pop(identity, (window, 0))
        count = count + 1 if seen_window == window else 1
        self._counts[identity] = (window, count)
        if len(self._counts) > self.max_identities:
            self._counts.popitem(last=False)
        return count


class RedisCounts:
    """Counts in Redis, one key per identity and window, expiring with the window."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)

    async def hit(self, identity: str, window: int, ttl: int) -> int:
        """INCR and EXPIRE in one transaction."""
        key = f"{REDIS_KEY_PREFIX}:{identity}:{window}"
        async with self.client.pipeline(transaction=True) as pipe:
            count, _ = await pipe.incr(key).expire(key, ttl).execute()
        return int(count)


class Quota:
    """Takes one request from an identity's quota and says what to answer."""

    def __init__(self, limit: RateLimit, counts: Counts) -> None:
        self.limit = limit
        self.counts = counts
        self._warned_at = -math.inf

    @classmethod
    def from_env(cls) -> "Quota | None":
        """The quota `IMAGE_GENERATION_RATE_LIMIT` sets (None if unset), in Redis if `HAYHOOKS_DURABLE_REDIS_URL` is."""
        raw = os.environ.get(RATE_LIMIT_ENV, "").strip()
        if not raw:
            return None
        url = os.environ.get(REDIS_URL_ENV, "").strip()
        return cls(RateLimit.parse(raw), RedisCounts(url) if url else MemoryCounts())

    async def take(self, identity: str) -> tuple[list[tuple[bytes, bytes]], int | None]:
        """The limit headers for this request, and the seconds to wait when it is over the limit (else None)."""
        now = time.time()
        window = int(now // self.limit.period)
        reset = max(1, math.ceil((window + 1) * self.limit.period - now))
        limit_header = (b"x-ratelimit-limit-requests", str(self.limit.requests).encode())
        try:
            count = await self.counts.hit(identity, window, self.limit.period + 1)
        except (RedisError, OSError) as e:
            STORE_ERRORS.inc()
            if now - self._warned_at >= WARNING_INTERVAL:
                self._warned_at = now
                log.warning("Quota store unreachable ({}): requests go through uncounted", type(e).__name__)
            return [limit_header], None
        headers = [
            limit_header,
            (b"x-ratelimit-remaining-requests", str(max(0, self.limit.requests - count)).encode()),
            (b"x-ratelimit-reset-requests", f"{reset}s".encode()),
        ]
        return headers, reset if count > self.limit.requests else None


def client_address(client: tuple[str, int] | None) -> str:
    """The client's address as a quota counts it: an IP address, an IPv6 one as its /64 network, else `unknown`."""
    try:
        address = ipaddress.ip_address(client[0]) if client else None
    except ValueError:
        address = None
    if address is None:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/{IPV6_SUBSCRIBER_PREFIX}", strict=False))
    return str(address)


def identity(key_id: str | None, client: tuple[str, int] | None) -> str:
    """
    Whose quota (and share of jobs and streams) a request takes from.

    Its API key's id (`guard.key_id`), else its client address (`client_address`): at most 64 characters either way.
    """
    if key_id is not None:
        return "key:" + key_id
    return "address:" + client_address(client)


async def limited_send(quota: Quota, who: str, send: Send) -> tuple[Send, int | None]:
    """
    Take one request from the quota of `who` (an `identity`).

    Returns `send` with the limit headers added to the answer, and the seconds to wait when the quota is spent (else
    None).
    """
    headers, retry_after = await quota.take(who)

    async def send_with_limits(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *headers]}
        await send(message)

    return send_with_limits, retry_after
