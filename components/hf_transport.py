"""
Sends the `Call`s of one generation over pooled connections, each bounded the same way.

The async path (the server's) runs on aiohttp, whose C parser reads a 512² reply for a third of the CPU that httpx2
takes (bench/); the blocking path (`Pipeline.run`) runs on httpx2.

Every call shares the request's deadline, reads its reply as a raw stream under a byte cap (per call, and the
component's total in flight), asks for `Accept-Encoding: identity` and refuses any compressed reply instead of
decoding it, follows no redirect, and turns every failure into a typed error. A URL taken from a reply is sent no
credentials, and is refused when it resolves to a loopback, private, link-local or otherwise non-public address;
the connection then goes to the address that was checked, so a second DNS answer cannot redirect it.
"""

import asyncio
import email.utils
import ipaddress
import json
import math
import re
import socket
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import httpx2

from components.byte_budget import ByteLease
from components.errors import (
    ImageGenerationError,
    InvalidImageError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamNotFoundError,
    UpstreamQuotaError,
    UpstreamRateLimitedError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from components.hf_providers import Call
from components.progress import ProgressCallback
from components.urls import parse_http_url

_DEFAULT_RETRY_AFTER = 5
_MAX_RETRY_AFTER = 3600
_MAX_LOADING_WAIT = 20.0
_ERROR_BODY_BYTES = 4096
_SAFE_REASON_RE = re.compile(r"[A-Za-z0-9 _.,:;'()+-]{1,200}")
_UNSAFE_REASON_RE = re.compile(r"https?:|hf_|bearer|token|traceback|javascript", re.IGNORECASE)
_DIGITS_RE = re.compile(r"[0-9]{1,20}")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Bounds:
    """What one generation may spend: a deadline (`time.monotonic()`), a byte lease; its progress callback, URL rule."""

    deadline: float
    lease: ByteLease
    report: ProgressCallback
    allowed_networks: tuple[Network, ...] = ()


def run_calls(client: httpx2.Client, calls: Generator[Call, bytes, bytes], bounds: Bounds) -> bytes:
    """Drive `calls` to the end over the blocking `client`; an error of a call is raised inside the generator."""
    step = _step(calls, None, None)
    while isinstance(step, Call):
        try:
            reply = fetch(client, step, bounds)
        except ImageGenerationError as e:
            step = _step(calls, None, e)
        else:
            step = _step(calls, reply, None)
    return step


async def run_calls_async(
    session: aiohttp.ClientSession, calls: Generator[Call, bytes, bytes], bounds: Bounds
) -> bytes:
    """The async twin of `run_calls`, over an aiohttp session."""
    step = _step(calls, None, None)
    while isinstance(step, Call):
        try:
            reply = await fetch_async(session, step, bounds)
        except ImageGenerationError as e:
            step = _step(calls, None, e)
        else:
            step = _step(calls, reply, None)
    return step


def _step(calls: Generator[Call, bytes, bytes], reply: bytes | None, error: Exception | None) -> Call | bytes:
    """The next call, or the image when the calls are done."""
    try:
        return calls.send(reply) if error is None else calls.throw(error)  # type: ignore[arg-type]
    except StopIteration as done:
        return done.value


def fetch(client: httpx2.Client, call: Call, bounds: Bounds) -> bytes:
    """Send `call` and return its reply body; a provider's 'model loading' 503 is retried until the deadline."""
    while True:
        started, status = time.monotonic(), "error"
        try:
            url, headers, sni_hostname = _target(call, _resolve(call, bounds))
            with client.stream(
                call.method, url, json=call.json, content=call.data, headers=headers,
                timeout=_remaining(bounds.deadline),
                extensions={"sni_hostname": sni_hostname} if sni_hostname else {},
            ) as response:  # fmt: skip
                status = response.status_code
                reader = _Reader(call, bounds, status, response.headers)
                _raise_for_status(status, response.headers, _error_body(response) if reader.error else b"")
                for chunk in response.iter_raw():
                    reader.take(chunk)
                    _remaining(bounds.deadline)
                return reader.body()
        except UpstreamUnavailableError as e:
            wait = _loading_wait(e, call, bounds.deadline)
        except httpx2.TimeoutException as e:
            status = "timeout"
            raise UpstreamTimeoutError("the upstream did not answer in time") from e
        except (httpx2.TransportError, OSError) as e:
            raise UpstreamError("the upstream could not be reached") from e
        finally:
            bounds.report({"phase": "upstream", "status": status, "seconds": time.monotonic() - started})
        time.sleep(wait)  # the provider is loading the model: try again


async def fetch_async(session: aiohttp.ClientSession, call: Call, bounds: Bounds) -> bytes:
    """The async twin of `fetch`, over an aiohttp session (made with `auto_decompress=False`)."""
    while True:
        started, status = time.monotonic(), "error"
        try:
            async with asyncio.timeout(_remaining(bounds.deadline)):
                url, headers, sni_hostname = _target(call, await _resolve_async(call, bounds))
                async with session.request(
                    call.method, url, json=call.json, data=call.data, headers=headers, server_hostname=sni_hostname,
                    allow_redirects=False,
                ) as response:  # fmt: skip
                    status = response.status
                    reader = _Reader(call, bounds, status, response.headers)
                    _raise_for_status(
                        status, response.headers, await _error_body_async(response) if reader.error else b""
                    )
                    async for chunk in response.content.iter_any():
                        reader.take(chunk)
                    return reader.body()
        except UpstreamUnavailableError as e:
            wait = _loading_wait(e, call, bounds.deadline)
        except TimeoutError as e:
            status = "timeout"
            raise UpstreamTimeoutError("the upstream did not answer in time") from e
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamError("the upstream could not be reached") from e
        finally:
            bounds.report({"phase": "upstream", "status": status, "seconds": time.monotonic() - started})
        await asyncio.sleep(wait)  # the provider is loading the model: try again


class _Reader:
    """
    Collects a 2xx body under the call's cap and the request's byte lease.

    A declared `Content-Length` is taken from the lease at once, so a reply that cannot fit is refused before it is
    read; a body of unknown length is counted as it arrives. The chunks are joined once, at the end: each byte is
    copied once, into a buffer of the body's exact size.
    """

    def __init__(self, call: Call, bounds: Bounds, status: int, headers: Mapping[str, str]) -> None:
        self.error = not 200 <= status < 300
        self.max_bytes = call.max_bytes
        self.lease = bounds.lease
        self.counted = 0
        self.size = 0
        self._chunks: list[bytes] = []
        if self.error:
            return
        if headers.get("content-encoding", "identity").strip().lower() != "identity":
            raise InvalidImageError("the upstream sent a compressed reply, which is refused")
        declared = headers.get("content-length", "")
        if _DIGITS_RE.fullmatch(declared):
            self._count(int(declared))

    def take(self, chunk: bytes) -> None:
        self._count(self.size + len(chunk))
        self._chunks.append(chunk)
        self.size += len(chunk)

    def _count(self, size: int) -> None:
        if size > self.max_bytes:
            raise InvalidImageError("the upstream reply is larger than the size cap")
        if size > self.counted:
            self.lease.take(size - self.counted)
            self.counted = size

    def body(self) -> bytes:
        return b"".join(self._chunks)


def _error_body(response: httpx2.Response) -> bytes:
    """The first few KB of an error reply, enough for its JSON reason; the rest is never read."""
    body = bytearray()
    for chunk in response.iter_raw():
        body += chunk
        if len(body) >= _ERROR_BODY_BYTES:
            break
    return bytes(body[:_ERROR_BODY_BYTES])


async def _error_body_async(response: aiohttp.ClientResponse) -> bytes:
    body = b""
    while len(body) < _ERROR_BODY_BYTES and (chunk := await response.content.read(_ERROR_BODY_BYTES - len(body))):
        body += chunk
    return body


def _target(call: Call, address: Address | None) -> tuple[str, dict[str, str], str | None]:
    """URL, headers and TLS server name to send `call` with: to the checked address itself for a result URL."""
    headers = {**call.headers, "accept-encoding": "identity"}
    if address is None:
        return call.url, headers, None
    parts = urlsplit(call.url)
    host = f"[{address}]" if address.version == 6 else str(address)
    netloc = f"{host}:{parts.port}" if parts.port else host
    headers["host"] = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=netloc)), headers, parts.hostname


def _resolve(call: Call, bounds: Bounds) -> Address | None:
    """For a result URL, the one public (or allowed) address it will be fetched from; None for other calls."""
    if call.purpose != "result":
        return None
    host, port = _host_port(call.url)
    _remaining(bounds.deadline)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return check_address([info[4][0] for info in infos], bounds.allowed_networks)


async def _resolve_async(call: Call, bounds: Bounds) -> Address | None:
    if call.purpose != "result":
        return None
    host, port = _host_port(call.url)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return check_address([info[4][0] for info in infos], bounds.allowed_networks)


def _host_port(url: str) -> tuple[str, int]:
    try:
        parts = parse_http_url(url)
        host = parts.hostname or ""
        host.encode("idna")
    except (ValueError, UnicodeError) as e:
        raise InvalidImageError("the upstream named a result URL that is not an http(s) URL with a host") from e
    return host, parts.port or (443 if parts.scheme == "https" else 80)


def check_address(addresses: list[str], allowed_networks: tuple[Network, ...] = ()) -> Address:
    """
    The first of `addresses` (one host's DNS answers) when every one is public or inside `allowed_networks`.

    :raises InvalidImageError: Some address is loopback, private, link-local, multicast, reserved or unspecified.
    """
    checked = [ipaddress.ip_address(address.split("%", 1)[0]) for address in addresses]
    if not checked:
        raise InvalidImageError("the upstream named a result URL that does not resolve")
    for address in checked:
        mapped = getattr(address, "ipv4_mapped", None) or address
        if not mapped.is_global and not any(mapped in network for network in allowed_networks):
            raise InvalidImageError("the upstream named a result URL inside a private network, which is refused")
    return checked[0]


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise UpstreamTimeoutError("the upstream did not answer in time")
    return remaining


def _loading_wait(error: UpstreamUnavailableError, call: Call, deadline: float) -> float:
    """How long to wait before retrying a provider's 503, or re-raise it when that is not done or too late."""
    wait = min(max(error.retry_after, 0.5), _MAX_LOADING_WAIT)
    if call.purpose != "generate" or time.monotonic() + wait >= deadline:
        raise error
    return wait


def _raise_for_status(status: int, headers: Mapping[str, str], body: bytes) -> None:
    if 200 <= status < 300:
        return
    error_json = _json_object(body)
    if status == 429:
        raise UpstreamRateLimitedError("the upstream is rate limiting", retry_after(headers, error_json))
    if status == 503:
        raise UpstreamUnavailableError("the upstream is unavailable", retry_after(headers, error_json))
    if status == 404 or headers.get("x-error-code") == "RepoNotFound":
        raise UpstreamNotFoundError(f"the upstream answered {status}")
    if status in (401, 403):
        raise UpstreamAuthError("upstream rejected the credentials")
    if status == 402:
        raise UpstreamQuotaError("the upstream answered 402")
    if status in (400, 422):
        raise UpstreamRejectedError("the upstream rejected the parameters", safe_reason(error_json))
    raise UpstreamError(f"the upstream answered {status}")  # 3xx included: redirects are never followed


def _json_object(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def retry_after(headers: Mapping[str, str], error_json: dict) -> int:
    """
    Seconds to wait, from `Retry-After` (seconds or an HTTP date), else HF's `estimated_time`, else a default.

    Always within 1..3600, whatever the upstream sent.
    """
    header = headers.get("retry-after", "").strip()
    seconds: float | None = None
    if _DIGITS_RE.fullmatch(header):  # ASCII digits only: "²".isdigit() is True
        seconds = int(header)
    elif header:
        try:
            seconds = email.utils.parsedate_to_datetime(header).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            seconds = None
    estimated = error_json.get("estimated_time")
    if seconds is None and isinstance(estimated, (int, float)) and math.isfinite(estimated):
        seconds = estimated
    if seconds is None:
        return _DEFAULT_RETRY_AFTER
    return int(min(max(math.ceil(seconds), 1), _MAX_RETRY_AFTER))


def safe_reason(error_json: dict) -> str | None:
    """The upstream's error text when it is short, plain ASCII words, and names no URL, markup or credential."""
    reason = error_json.get("error")
    if isinstance(reason, list):
        reason = "; ".join(str(item) for item in reason)
    if not isinstance(reason, str) or not _SAFE_REASON_RE.fullmatch(reason) or _UNSAFE_REASON_RE.search(reason):
        return None
    return reason
