"""Uvicorn's httptools protocol (llhttp, in C) with a cap and a deadline on the request head, and a send timeout."""

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Largest request line plus headers accepted; a head still incomplete past it is a 400 and the connection closes.
MAX_HEADER_BYTES = 16 * 1024
HEAD_TIMEOUT_ANSWER = "Request head took too long."


class CappedHttpToolsProtocol(HttpToolsProtocol):
    """
    `HttpToolsProtocol` that takes a request head of at most `MAX_HEADER_BYTES` in `head_timeout` seconds at most.

    Uvicorn's own httptools protocol parses a head of any size (a 64 MiB header was a 200). Here the bytes of a head
    are counted as they arrive; bytes past the cap are never handed to the parser, and the client gets a 400.
    Uvicorn has no deadline for a head either (its keep-alive timeout runs only between requests): a client that
    connects and sends nothing, or sends its headers a byte at a time, held its connection for ever. Here a head has
    `head_timeout` seconds from its first byte (a connection's first, from the connection): then a 408, or for a
    connection that sent nothing, the connection closed.
    A connection whose client leaves its answer unread (the send buffer full) for `send_timeout` seconds is closed.
    """

    def __init__(self, *args, send_timeout: float, head_timeout: float, **kwargs) -> None:
        """Uvicorn's protocol; the two timeouts are the settings' (`send_timeout`, `head_timeout`)."""
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True
        self.send_timeout = send_timeout
        self._stalled: asyncio.TimerHandle | None = None
        self.head_timeout = head_timeout
        self._head_due: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # noqa: D102
        super().connection_made(transport)
        self._start_head_clock()

    def pause_writing(self) -> None:
        """The send buffer is full: the client has `send_timeout` seconds to read before the connection is closed."""
        super().pause_writing()
        if self._stalled is None:
            self._stalled = self.loop.call_later(self.send_timeout, self._cut_off)

    def resume_writing(self) -> None:  # noqa: D102
        self._stalled = _cancelled(self._stalled)
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self._stalled = _cancelled(self._stalled)
        self._head_due = _cancelled(self._head_due)
        super().connection_lost(exc)

    def _start_head_clock(self) -> None:
        self._head_due = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _head_too_slow(self) -> None:
        """The head is not complete in time: 408 (nothing for a connection that sent nothing), then closed."""
        self._head_due = None
        if self.cycle is not None and not self.cycle.response_complete:  # an answer is going out: wait for it
            self._start_head_clock()
            return
        if self._head_bytes == 0:
            self.transport.close()
            return
        self.logger.info("Request head not received in %s s: connection closed", self.head_timeout)
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(HEAD_TIMEOUT_ANSWER), HEAD_TIMEOUT_ANSWER.encode())
        )
        self.transport.close()

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
        if self._head_due is None:  # a new request begins: its head is due in `head_timeout`
            self._start_head_clock()
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
        self._head_due = _cancelled(self._head_due)
        super().on_headers_complete()

    def on_message_complete(self) -> None:  # noqa: D102
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0


def _cancelled(timer: asyncio.TimerHandle | None) -> None:
    """Cancel `timer`, if any; None, for the attribute that held it."""
    if timer is not None:
        timer.cancel()
