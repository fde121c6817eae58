"""Uvicorn's httptools protocol (llhttp, in C) with a cap on the request head, which httptools itself lacks."""

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Largest request line plus headers accepted; a head still incomplete past it is a 400 and the connection closes.
MAX_HEADER_BYTES = 16 * 1024


class CappedHttpToolsProtocol(HttpToolsProtocol):
    """
    `HttpToolsProtocol` that reads at most `MAX_HEADER_BYTES` of a request head, as h11's incomplete-event cap does.

    Uvicorn's own httptools protocol parses a head of any size (a 64 MiB header was a 200). Here the bytes of a head
    are counted as they arrive; bytes past the cap are never handed to the parser, and the client gets a 400.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True

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
