"""Uvicorn's httptools protocol (llhttp, in C) with a cap on the request head and a send timeout, both missing there."""

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Largest request line plus headers accepted; a head still incomplete past it is a 400 and the connection closes.
MAX_HEADER_BYTES = 16 * 1024
DEFAULT_SEND_TIMEOUT = 30.0


class CappedHttpToolsProtocol(HttpToolsProtocol):
    """
    `HttpToolsProtocol` that reads at most `MAX_HEADER_BYTES` of a request head, and times out unread answers.

    A connection whose client leaves its answer unread (the send buffer full) for `send_timeout` seconds is closed.
    Uvicorn's own httptools protocol parses a head of any size (a 64 MiB header was a 200). Here the bytes of a head
    are counted as they arrive; bytes past the cap are never handed to the parser, and the client gets a 400.
    """

    def __init__(self, *args, send_timeout: float = DEFAULT_SEND_TIMEOUT, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True
        self.send_timeout = send_timeout
        self._stalled: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        """The send buffer is full: the client has `send_timeout` seconds to read before the connection is closed."""
        super().pause_writing()
        if self._stalled is None:
            self._stalled = self.loop.call_later(self.send_timeout, self._cut_off)

    def resume_writing(self) -> None:  # noqa: D102
        self._stop_watch()
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self._stop_watch()
        super().connection_lost(exc)

    def _stop_watch(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _cut_off(self) -> None:
        """Drop the connection, and with it what its send buffer holds; the request sees a disconnect and ends."""
        self._stalled = None
        self.logger.info("Client read nothing for %s s: connection closed", self.send_timeout)
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        """Feed the parser, counting the bytes of an unfinished head; refuse the head that outgrows the cap."""
        if not self._in_head:
            super().data_received(data)
            return
        room = MAX_HEADER_BYTES - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        super().data_received(data[:room])  # the head may end inside what fits
        if self.transport.is_closing():  # the parser refused what fit: uvicorn has answered 400 already
            return
        if self._in_head:
            message = "Request head too large."
            self.logger.warning(message)
            self.send_400_response(message)
            return
        self.data_received(data[room:])

    def on_headers_complete(self) -> None:  # noqa: D102
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:  # noqa: D102
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0
