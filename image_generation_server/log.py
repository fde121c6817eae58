"""
The server's log: one access line per request, the components' records through hayhooks' log, parameters shortened.

Hayhooks logs three more lines per pipeline run ("Running pipeline" with its parameters, prompt included, then
"streaming response started" or "completed"): they are kept at `HAYHOOKS_LOG_LEVEL=DEBUG` only. Each line costs the
server about 0.15 ms of CPU, a tenth of the whole request; filtered out, still about 0.05 ms (loguru builds the record
before any filter sees it), so once the server is up they are not built at all (`quiet_per_run_chatter`).
The access line is Uvicorn's, written by `access_logged` straight to the log: Uvicorn's own goes through a stdlib
record and Hayhooks' bridge to the same log, about 0.1 ms more per request.
"""

import logging
import os
from collections.abc import Collection
from typing import Any

from hayhooks import log
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from image_generation_server.private_hayhooks import add_stderr_log, log_through_hayhooks, skip_per_run_chatter

LOGGED_TEXT_CHARS = 64
VERBOSE_LEVELS = ("DEBUG", "TRACE")  # Hayhooks' per-run lines are kept at these


def log_level() -> str:
    """Hayhooks' log level: `HAYHOOKS_LOG_LEVEL`, else `LOG`, else INFO."""
    return (os.getenv("HAYHOOKS_LOG_LEVEL") or os.getenv("LOG", "INFO")).upper()


def configure_server_log() -> None:
    """Hayhooks' log without its per-run chatter, fed the `components` loggers' records, parameters shortened."""
    level = log_level()
    log.configure(patcher=truncate_logged_params)
    log.remove()  # hayhooks' one handler, added at its import, is added again with the filter
    add_stderr_log(level, per_run_chatter=level in VERBOSE_LEVELS)
    log_through_hayhooks(["components"])  # hayhooks' std-logging-to-loguru bridge
    logging.getLogger("components").setLevel(level if level in logging.getLevelNamesMapping() else logging.DEBUG)


def quiet_per_run_chatter() -> None:
    """
    Skip Hayhooks' per-run lines at the call, before loguru builds them; at DEBUG they stay.

    For after the startup deploy: the module that logs them then logs nothing else (its warnings are about skipped
    pipeline files, at deploy time).
    """
    if log_level() not in VERBOSE_LEVELS:
        skip_per_run_chatter()


def truncate_logged_params(record: dict[str, Any]) -> None:
    """Loguru patcher: shorten long strings in the `params` hayhooks logs with every run, and make them printable."""
    params = record["extra"].get("params")
    if isinstance(params, dict):
        record["extra"]["params"] = {name: _loggable(value) for name, value in params.items()}


def _loggable(value: object) -> object:
    if not isinstance(value, str):
        return value
    short = value[:LOGGED_TEXT_CHARS] + "…" if len(value) > LOGGED_TEXT_CHARS else value
    return short.encode("utf-8", "replace").decode("utf-8")


def access_logged(app: ASGIApp, excluded_prefixes: Collection[str] = ()) -> ASGIApp:
    """
    `app`, logging Uvicorn's access line for each HTTP answer (`client - "METHOD path HTTP/version" status`).

    Outermost, it sees every answer the app sends, refusals and errors included, as Uvicorn's access log does; a path
    that starts with one of `excluded_prefixes` is not logged (Hayhooks' `access_log_excluded_path_prefixes`).
    """
    excluded = tuple(excluded_prefixes)

    async def logged(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(excluded):
            await app(scope, receive, send)
            return

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                log.info(access_line(scope, message["status"]))
            await send(message)

        await app(scope, receive, send_logged)

    return logged


def access_line(scope: Scope, status: int) -> str:
    """Uvicorn's access line: the client, the request line (its path as Uvicorn writes it), the status."""
    request = f"{scope['method']} {get_path_with_query_string(scope)} HTTP/{scope['http_version']}"
    return f'{get_client_addr(scope)} - "{request}" {status}'
