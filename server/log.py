"""The server's log: the components' records go to hayhooks' log, and request parameters are logged shortened."""

from typing import Any

from hayhooks import log
from hayhooks.server.logger import intercept_stdlib_logging

LOGGED_TEXT_CHARS = 64


def configure_server_log() -> None:
    """Send the `components` loggers' records through hayhooks' log, and shorten the parameters it logs."""
    log.configure(patcher=truncate_logged_params)
    intercept_stdlib_logging(["components"])  # hayhooks' own std-logging-to-loguru bridge; its level filters


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
