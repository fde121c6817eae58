"""HTTP-side guards of the wrapper: optional API keys and the request body cap."""

import hmac
import os

from fastapi import HTTPException
from starlette.datastructures import Headers

API_KEYS_ENV = "IMAGE_GENERATION_API_KEYS"
MAX_BODY_BYTES = 64 * 1024


def api_keys_from_env() -> tuple[bytes, ...]:
    """The accepted API keys from `IMAGE_GENERATION_API_KEYS` (comma-separated); none means auth is off."""
    return tuple(key.strip().encode() for key in os.environ.get(API_KEYS_ENV, "").split(",") if key.strip())


def check_request(headers: Headers | None, api_keys: tuple[bytes, ...]) -> None:
    """Raise 413 for a body over the cap and 401 for a missing or wrong Bearer key (when keys are configured)."""
    headers = headers or Headers()
    length = headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise HTTPException(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    if not api_keys:
        return
    scheme, _, supplied = headers.get("authorization", "").partition(" ")
    supplied_bytes = supplied.strip().encode()
    # Compare against every key so that the time taken does not depend on which one matched.
    matched = [hmac.compare_digest(supplied_bytes, key) for key in api_keys]
    if scheme.lower() != "bearer" or not any(matched):
        raise HTTPException(401, "a valid API key is required", headers={"WWW-Authenticate": "Bearer"})
