"""
Memory held by answers: what a door builds from a request's images counts in a byte budget until it is sent.

The upstream's replies are bounded while they are read (`IMAGE_GENERATION_MAX_INFLIGHT_BYTES`); what a door makes of
them afterwards (the images' base64, the JSON or MCP result around them) used to be unbounded: 24 clients of
`n: 10` at 2048² took the server past 2 GB. Now `HTTPGuard` opens a share of `IMAGE_GENERATION_MAX_ANSWER_BYTES` for
each request that takes a body, and gives it back only when the request is over, after the last byte of its answer
has been handed to the connection (`paced`: a large body goes out in chunks, each written once the previous one
has left). A door reserves its worst case before any work (`reserve`): width x height x 4 bytes per image (the
base64 of an image that does not compress) for each copy of the images it will hold, and refuses a request whose
`n x width x height` is over `IMAGE_GENERATION_MAX_REQUEST_PIXELS`; once the images are made, the share shrinks to
their real size. No room is a 503 with `Retry-After`, before the upstream is called. A client that stops reading is
cut off after `IMAGE_GENERATION_SEND_TIMEOUT` (`image_generation_server.http_protocol`), which ends its request.
"""

import asyncio
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar

from haystack.dataclasses import ImageContent
from starlette.types import Message, Send

from components.errors import InvalidRequestError, ServerBusyError
from image_generation_server.allocator import release_free_memory
from image_generation_server.settings import env_name

RETRY_AFTER_SECONDS = 1
HEADROOM_BYTES = 64 * 1024  # per image: the JSON around it, an incompressible image's container
CHUNK_BYTES = 1024 * 1024  # a body larger than this is sent in pieces of this size, each after the last has left
RELEASE_AFTER_SECONDS = 1.0  # idle this long after the last answer, the allocator's free memory is given back
# What a JSON variant (a wrapper Hayhooks answers in JSON) holds: the images' base64, and the body FastAPI writes
# from them straight to bytes (its fast path for a route with a response model).
JSON_COPIES = 2


class AnswerBudget:
    """The bytes all requests' answers may hold at once, and the pixels one request may ask for (event loop only)."""

    def __init__(self, max_bytes: int, max_pixels: int) -> None:
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.in_use = 0
        self._release: asyncio.TimerHandle | None = None

    def give_back(self, size: int) -> None:
        """
        Take `size` bytes off what is in use.

        Once nothing is, and stays so for `RELEASE_AFTER_SECONDS`, the free memory the allocator kept from the answers
        goes back to the kernel: after a burst the process returns near its size before it.
        """
        self.in_use -= size
        if self.in_use or not size:
            return
        if self._release is not None:
            self._release.cancel()
        self._release = asyncio.get_running_loop().call_later(RELEASE_AFTER_SECONDS, self._release_if_idle)

    def _release_if_idle(self) -> None:
        self._release = None
        if not self.in_use:
            release_free_memory()


class Share:
    """One request's share of the budget: reserved before the work, shrunk to what it holds, given back at the end."""

    def __init__(self, budget: AnswerBudget) -> None:
        self.budget = budget
        self.held = 0
        self.copies = 0

    def reserve(self, n: int, width: int, height: int, copies: int) -> None:
        """
        Reserve room for `copies` copies of `n` images of `width` x `height`, at their worst.

        :raises InvalidRequestError: `n x width x height` is over the per-request cap.
        :raises ServerBusyError: The answers in flight leave no room for this one.
        """
        check_pixels(n, width, height, self.budget.max_pixels)
        self._take(copies * n * (width * height * 4 + HEADROOM_BYTES))
        self.copies = copies

    def hold(self, images: Sequence[ImageContent]) -> None:
        """Hold the reserved copies of `images` from now on (their base64), if that is less (`shrink_to`)."""
        self.shrink_to(self.copies * base64_bytes([image.base64_image for image in images]))

    def shrink_to(self, size: int) -> None:
        """Hold `size` bytes from now on, if that is less than the reservation (the images turned out smaller)."""
        if size < self.held:
            self.budget.give_back(self.held - size)
            self.held = size

    def _take(self, size: int) -> None:
        if self.budget.in_use + size > self.budget.max_bytes:
            raise ServerBusyError("too many answers in flight", retry_after=RETRY_AFTER_SECONDS)
        self.budget.in_use += size
        self.held += size


def check_pixels(n: int, width: int, height: int, max_pixels: int) -> None:
    """Refuse a request for more than `max_pixels` in all (`InvalidRequestError`, a 4xx at every door)."""
    if (pixels := n * width * height) > max_pixels:
        raise InvalidRequestError(
            f"n x width x height = {pixels} pixels is over this server's cap of {max_pixels} "
            f"({env_name('max_request_pixels')}): ask for fewer or smaller images"
        )


UNBOUNDED = AnswerBudget(sys.maxsize, sys.maxsize)
_SHARE: ContextVar[Share | None] = ContextVar("answer_share", default=None)


@asynccontextmanager
async def share_of(budget: AnswerBudget) -> AsyncIterator[Share]:
    """The current request's share, for the duration of the block (the request, its answer sent); then given back."""
    share = Share(budget)
    token = _SHARE.set(share)
    try:
        yield share
    finally:
        _SHARE.reset(token)
        share.shrink_to(0)


def reserve(n: int, width: int, height: int, copies: int) -> Share:
    """
    Reserve the current request's answer (`Share.reserve`); the share `HTTPGuard` opened for the request.

    Tasks a request starts (the MCP SDK runs each call in one) see its share too. Outside this server's app (a plain
    `hayhooks run` serving the wrapper, without `HTTPGuard`) nothing is counted.
    """
    share = _SHARE.get() or Share(UNBOUNDED)
    share.reserve(n, width, height, copies)
    return share


def base64_bytes(images: Sequence[str]) -> int:
    """What the images' base64 strings hold."""
    return sum(len(image) for image in images)


def paced(send: Send) -> Send:
    """`send` that hands a large body to the connection a chunk at a time, each once the previous one has left."""

    async def send_paced(message: Message) -> None:
        body = message.get("body", b"")
        if message["type"] != "http.response.body" or len(body) <= CHUNK_BYTES:
            await send(message)
            return
        # Pieces of the body itself, not copies: Uvicorn hands each to the transport, which takes any buffer.
        view, more = memoryview(body), message.get("more_body", False)
        for start in range(0, len(view), CHUNK_BYTES):
            last = start + CHUNK_BYTES >= len(view)
            await send(
                {"type": "http.response.body", "body": view[start : start + CHUNK_BYTES], "more_body": more or not last}
            )

    return send_paced
