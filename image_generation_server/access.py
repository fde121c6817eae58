"""
Who may reach the server, defined once: the API keys, the `Host` names it answers to, the browser origins.

`HTTPGuard` applies them to every route, MCP and the job routes included; the job routes take the key's id that the
guard found.

By default nothing is cross-origin and only loopback names (and the bind address) are answered, so neither a page on
another site (CSRF) nor a DNS-rebound name can drive the server. `IMAGE_GENERATION_ALLOWED_HOSTS` and Hayhooks'
`HAYHOOKS_CORS_*` settings open it up. The values come from the settings object; nothing here reads the environment.
"""

import hashlib
import hmac
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from hayhooks.settings import AppSettings

from components.urls import is_http_url
from image_generation_server.private_hayhooks import default_hayhooks_settings

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")  # noqa: S104 (names, not a bind)
# CORS defaults for when origins are listed but these are not (Hayhooks allows every method and header by default).
CORS_DEFAULTS = {
    "cors_allow_origins": [],
    "cors_allow_methods": ["GET", "POST"],
    "cors_allow_headers": ["Authorization", "Content-Type", "If-None-Match", "Idempotency-Key", "Last-Event-ID"],
    "cors_expose_headers": ["X-Seed", "ETag", "Content-Disposition", "Retry-After", "Location"],
}


def configure_cors() -> None:
    """Replace Hayhooks' allow-everything CORS defaults with ours for every `HAYHOOKS_CORS_*` setting left unset."""
    default_hayhooks_settings(**{name: list(value) for name, value in CORS_DEFAULTS.items()})


def cors_enabled(settings: AppSettings) -> bool:
    """Whether any origin is allowed cross-origin access (`HAYHOOKS_CORS_ALLOW_ORIGINS` or its regex)."""
    return bool(settings.cors_allow_origins or settings.cors_allow_origin_regex)


class ApiKeys:
    """The API keys accepted as `Authorization: Bearer <key>`; none means auth is off."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(key.encode() for key in keys if key)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def owner(self, authorization: str) -> str | None:
        """The id (`key_id`) of the key an `Authorization` header carries, if it is one of these; else None."""
        scheme, _, supplied = authorization.partition(" ")
        supplied_bytes = supplied.strip().encode()
        # Compare against every key so that the time taken does not depend on which one matched.
        matched = [key for key in self._keys if hmac.compare_digest(supplied_bytes, key)]
        return key_id(matched[0]) if matched and scheme.lower() == "bearer" else None


def key_id(key: bytes) -> str:
    """A stable id for an API key that reveals nothing of it: its cache scope, its quota and the owner of its jobs."""
    return hashlib.sha256(key).hexdigest()[:32]


class HostAllowList:
    """
    The `Host` names the server answers to.

    The configured names (`IMAGE_GENERATION_ALLOWED_HOSTS`; `*.example.com` matches subdomains, `*` anything) when
    there are any; otherwise the loopback names, plus the address the server binds to when that is one specific
    address.
    """

    def __init__(self, bind_host: str, configured: Iterable[str] = ()) -> None:
        names = [name.strip().lower() for name in configured if name.strip()]
        if not names:
            names = list(LOOPBACK_NAMES)
            if bind_host not in WILDCARD_BINDS and bind_host.lower() not in names:
                names.append(bind_host.lower())
        self.any = "*" in names
        self.exact = frozenset(name for name in names if not name.startswith("*"))
        self.suffixes = tuple(name[1:] for name in names if name.startswith("*."))

    def allows(self, host_header: str) -> bool:
        """Whether a request's `Host` header (with or without a port) names this server."""
        if self.any:
            return True
        name = host_name(host_header)
        return name in self.exact or (bool(name) and name.endswith(self.suffixes))


class OriginPolicy:
    """
    Which browser origins may send state-changing requests: the request's own origin, and those CORS allows.

    A page's `fetch` or form on another origin carries an `Origin` header that names it; refusing those requests
    before any work stops cross-site request forgery, including the "simple" requests CORS lets through unread.
    """

    def __init__(self, settings: AppSettings) -> None:
        self.any = "*" in settings.cors_allow_origins
        self.origins = frozenset(origin.rstrip("/").lower() for origin in settings.cors_allow_origins)
        self.regex = re.compile(settings.cors_allow_origin_regex) if settings.cors_allow_origin_regex else None

    def allows(self, origin: str | None, host_header: str) -> bool:
        """Whether a request with this `Origin` (None when absent: not a browser's cross-site call) may proceed."""
        if origin is None or self.any:
            return True
        origin = origin.rstrip("/").lower()
        if origin in self.origins or (self.regex is not None and self.regex.fullmatch(origin)):
            return True
        return is_http_url(origin) and urlsplit(origin).netloc == host_header.lower()


def host_name(host_header: str) -> str:
    """The name in a `Host` header, lower-case, without the port or an IPv6 literal's brackets."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
