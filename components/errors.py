"""
Typed errors raised by the text-to-image components.

Each class says what went wrong, not how to tell an HTTP client: the wrapper maps them to status codes and fixed
messages. Messages here may name parameters but never tokens, URLs or upstream bodies.
"""


class ImageGenerationError(Exception):
    """Base class of every error the components raise on purpose."""


class InvalidRequestError(ImageGenerationError, ValueError):
    """A request parameter is out of range or not allowed; nothing was sent upstream."""


class ServerBusyError(ImageGenerationError):
    """The local concurrency cap and its wait queue are full."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamError(ImageGenerationError):
    """The upstream failed in a way the client cannot fix (5xx, broken reply, refused connection)."""


class UpstreamRetryableError(UpstreamError):
    """The upstream asked us to come back later (429 or 503); `retry_after` is in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamRateLimitedError(UpstreamRetryableError):
    """The upstream answered 429."""


class UpstreamUnavailableError(UpstreamRetryableError):
    """The upstream answered 503 (for example while the model loads) past our deadline."""


class UpstreamAuthError(UpstreamError):
    """The upstream answered 401 or 403: the server's credentials were rejected."""


class MissingTokenError(UpstreamAuthError):
    """The upstream refused a request that went without a token, because the server has none configured."""


class UpstreamQuotaError(UpstreamError):
    """The upstream answered 402: the account behind the token has no credits left."""


class UpstreamRejectedError(UpstreamError):
    """The upstream answered 400/422: it refused the parameters. `reason` is safe to show, or None."""

    def __init__(self, message: str, reason: str | None) -> None:
        super().__init__(message)
        self.reason = reason


class UpstreamNotFoundError(UpstreamError):
    """The upstream answered 404 (or the Hub said the repository does not exist)."""


class UnknownModelError(InvalidRequestError):
    """The Hub does not know the model, or no supported provider serves it for text-to-image."""


class UpstreamTimeoutError(UpstreamError):
    """The upstream did not answer within the deadline."""


class InvalidImageError(UpstreamError):
    """The upstream answered 200 with something that is not the image we asked for."""


class GenerationTimeoutError(ImageGenerationError):
    """A local model did not finish within the deadline; it was stopped at the next denoising step."""


class PipelineNotServedError(ImageGenerationError):
    """The server has no image pipeline deployed (yet, or any more) to run a request on."""


class SigningError(ImageGenerationError):
    """C2PA signing failed or ran past its deadline; no unsigned image is served in its place."""
