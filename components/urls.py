"""
What the service takes for a URL, defined once: an absolute `http` or `https` URL with a host, split by `urllib.parse`.

Used for the endpoint and router URLs, the timestamp authority, the result URLs providers name, browsers' `Origin`
headers and the settings that hold URLs. `http://` (no host), `https:/x`, `ftp://x` and a port that is not a number
are refused.
"""

from urllib.parse import SplitResult, urlsplit

SCHEMES = ("http", "https")


def parse_http_url(value: str) -> SplitResult:
    """The parts of `value` when it is an http(s) URL with a host (and a numeric port, if any); else `ValueError`."""
    parts = urlsplit(value)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ValueError("must be an http(s) URL with a host")
    parts.port  # noqa: B018 (raises ValueError for a port that is not a number in range)
    return parts


def is_http_url(value: object) -> bool:
    """Whether `value` is a string that `parse_http_url` accepts."""
    if not isinstance(value, str):
        return False
    try:
        parse_http_url(value)
    except ValueError:
        return False
    return True
