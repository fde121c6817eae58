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
import json
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, Protocol

from hayhooks import log
from hayhooks.settings import settings as hayhooks_settings
from prometheus_client import Counter
from redis import asyncio as redis
from redis.exceptions import RedisError
from starlette.types import Message, Send

from components.request import MAX_IMAGES
from image_generation_server.settings import Settings

IDENTITY_SCOPE_KEY = "image_generation.identity"  # where `HTTPGuard` leaves the request's `identity` for the doors
IPV6_SUBSCRIBER_PREFIX = 64  # one IPv6 client is its /64: a subscriber gets at least that many addresses
MAX_MEMORY_IDENTITIES = 65536  # the in-process counter forgets the least recently seen beyond this
REDIS_TIMEOUT = 0.5  # seconds a quota check may wait for Redis before failing open
REDIS_KEY_PREFIX = "image-generation:quota"
_FORM_N = re.compile(rb'name="n"\r\n\r\n(\d{1,3})\r\n')  # a multipart form's `n` field
WARNING_INTERVAL = 60.0  # seconds between two warnings that Redis is unreachable

STORE_ERRORS = Counter(
    "image_generation_quota_store_errors", "Quota checks let through because the quota store could not be reached"
)


@dataclass(frozen=True)
class RateLimit:
    """At most `requests` per `period` seconds."""

    requests: int
    period: int


class Counts(Protocol):
    """Where the requests (or images) of each identity in each window are counted."""

    async def hit(self, identity: str, window: int, ttl: int, amount: int = 1) -> int:
        """Add `amount` to the count of `identity` in `window` (a negative one gives back); returns the count."""
        ...


class MemoryCounts:
    """Counts in this process, for at most `MAX_MEMORY_IDENTITIES` identities (the least recently seen go first)."""

    def __init__(self, max_identities: int = MAX_MEMORY_IDENTITIES) -> None:
        self.max_identities = max_identities
        self._counts: OrderedDict[str, tuple[int, int]] = OrderedDict()

    async def hit(self, identity: str, window: int, ttl: int, amount: int = 1) -> int:
        """Add to the count (the event loop is the only writer: no lock)."""
        seen_window, count = self._counts.pop(identity, (window, 0))
        count = (count if seen_window == window else 0) + amount
        self._counts[identity] = (window, count)
        if len(self._counts) > self.max_identities:
            self._counts.popitem(last=False)
        return count


class RedisCounts:
    """Counts in Redis, one key per identity and window, expiring with the window."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)

    async def hit(self, identity: str, window: int, ttl: int, amount: int = 1) -> int:
        """INCRBY and EXPIRE in one transaction."""
        key = f"{REDIS_KEY_PREFIX}:{identity}:{window}"
        async with self.client.pipeline(transaction=True) as pipe:
            count, _ = await pipe.incrby(key, amount).expire(key, ttl).execute()
        return int(count)


class Quota:
    """
    Takes a request from an identity's quota and says what to answer.

    `unit` is what the quota counts: `requests`, or `images` (a request for `n` images takes `n`).
    """

    def __init__(self, limit: RateLimit, counts: Counts, unit: Literal["requests", "images"] = "requests") -> None:
        self.limit = limit
        self.counts = counts
        self.unit = unit
        self._warned_at = -math.inf

    @classmethod
    def from_settings(cls, settings: Settings) -> "Quota | None":
        """
        The quota `IMAGE_GENERATION_RATE_LIMIT` sets (None if unset).

        Counted in Redis when Hayhooks' `HAYHOOKS_DURABLE_REDIS_URL` is set (every replica sees the same counts),
        else in this process.
        """
        if settings.quota is None:
            return None
        url = hayhooks_settings.durable_redis_url if "durable_redis_url" in hayhooks_settings.model_fields_set else ""
        counts = RedisCounts(url) if url.strip() else MemoryCounts()
        return cls(RateLimit(*settings.quota), counts, settings.rate_limit_unit)

    async def take(self, identity: str, cost: int = 1) -> tuple[list[tuple[bytes, bytes]], int | None]:
        """
        The limit headers for this request, and the seconds to wait when it is over the limit (else None).

        A request over the limit takes nothing: its `cost` is given back.
        """
        now = time.time()
        window = int(now // self.limit.period)
        reset = max(1, math.ceil((window + 1) * self.limit.period - now))
        unit = self.unit.encode()
        limit_header = (b"x-ratelimit-limit-" + unit, str(self.limit.requests).encode())
        ttl = self.limit.period + 1
        try:
            count = await self.counts.hit(identity, window, ttl, cost)
            if count > self.limit.requests:
                count = await self.counts.hit(identity, window, ttl, -cost)
                over = True
            else:
                over = False
        except (RedisError, OSError) as e:
            STORE_ERRORS.inc()
            if now - self._warned_at >= WARNING_INTERVAL:
                self._warned_at = now
                log.warning("Quota store unreachable ({}): requests go through uncounted", type(e).__name__)
            return [limit_header], None
        headers = [
            limit_header,
            (b"x-ratelimit-remaining-" + unit, str(max(0, self.limit.requests - count)).encode()),
            (b"x-ratelimit-reset-" + unit, f"{reset}s".encode()),
        ]
        return headers, reset if over else None


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

    Its API key's id (`access.key_id`), else its client address (`client_address`): at most 64 characters either way.
    """
    if key_id is not None:
        return "key:" + key_id
    return "address:" + client_address(client)


def images_asked(body: bytes, multipart: bool) -> int:
    """
    How many images a request body asks for: its `n` (an MCP call's `arguments.n`, a form's `n` field), else 1.

    A value that is not a whole number from 1 to `MAX_IMAGES` counts as 1: the route refuses it.
    """
    try:
        if multipart:
            found = _FORM_N.search(body)
            n = int(found.group(1)) if found else 1
        else:
            value = json.loads(body)
            arguments = value.get("params", {}).get("arguments", {}) if value.get("method") == "tools/call" else value
            n = arguments.get("n", 1)
    except (ValueError, AttributeError, RecursionError):
        return 1
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_IMAGES else 1


async def limited_send(quota: Quota, who: str, send: Send, cost: int = 1) -> tuple[Send, int | None]:
    """
    Take `cost` (requests, or images) from the quota of `who` (an `identity`).

    Returns `send` with the limit headers added to the answer, and the seconds to wait when the quota is spent (else
    None).
    """
    headers, retry_after = await quota.take(who, cost)

    async def send_with_limits(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *headers]}
        await send(message)

    return send_with_limits, retry_after
