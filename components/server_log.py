"""The server's log: the components' records go to hayhooks' log, and request parameters are logged shortened."""

import logging
from typing import Any

from hayhooks import log

LOGGED_TEXT_CHARS = 64


def configure_server_log() -> None:
    """Send the `components` loggers' INFO and above to hayhooks' log, and shorten the parameters it logs."""
    log.configure(patcher=truncate_logged_params)
    components_logger = logging.getLogger("components")
    if not any(isinstance(handler, _ToHayhooksLog) for handler in components_logger.handlers):
        components_logger.addHandler(_ToHayhooksLog())
    components_logger.setLevel(logging.INFO)
    components_logger.propagate = False


class _ToHayhooksLog(logging.Handler):
    """A standard-logging handler that re-emits each record through hayhooks' loguru logger."""

    def emit(self, record: logging.LogRecord) -> None:
        log.opt(exception=record.exc_info).log(record.levelname, "{}", record.getMessage())


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
