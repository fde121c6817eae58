"""
`GET /status`, the liveness answer, and `GET /ready`: whether the server can serve an image now, checked for free.

`/status` says only that the server is alive (`Up!`, or `Degraded` while the job store is away) and which pipelines
it serves; Hayhooks' whole answer (job slots, the store's job counts, every deployment's health) is for the operator
(`Authorization: Bearer $HAYHOOKS_TRACING_TOKEN`): the counts tell one client what the others are doing.

`/ready` also checks that the image pipeline is deployed and warmed up
(for a local model: loaded, on a device that is still there) and that each upstream host its requests go to
resolves and accepts a TCP connection within `PROBE_TIMEOUT` seconds. Nothing is sent over those connections, so a
probe costs no credits. One probe runs at a time, and its answer is reused for `REUSE_SECONDS`, so that a flood of
`/ready` requests cannot turn into a flood of connections upstream. The answer names no host: details go to the log.
"""

import asyncio
import time
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from hayhooks import log

from components.errors import PipelineNotServedError
from image_generation_server.generation import COMPONENT, served_pipeline
from image_generation_server.private_hayhooks import StatusResponse, hayhooks_status, is_operator
from image_generation_server.private_starlette import move_ahead
from image_generation_server.settings import Settings

PROBE_TIMEOUT = 2.0
REUSE_SECONDS = 5.0


class Readiness:
    """The latest readiness answer, probed again when older than `REUSE_SECONDS`."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._answer: tuple[float, bool, dict[str, str]] | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> tuple[bool, dict[str, str]]:
        """Whether the server is ready, and each check's outcome (`ok` or why not)."""
        async with self._lock:
            if self._answer is None or time.monotonic() - self._answer[0] > REUSE_SECONDS:
                ready, checks = await self._probe()
                self._answer = (time.monotonic(), ready, checks)
            return self._answer[1], self._answer[2]

    async def _probe(self) -> tuple[bool, dict[str, str]]:
        try:
            component = served_pipeline(self.app).get_component(COMPONENT)
        except PipelineNotServedError:
            return False, {"pipeline": "not deployed"}
        if not component.ready():
            return False, {"pipeline": "not ready"}
        checks = {"pipeline": "ok"}
        urls = component.upstream_urls()
        if urls:
            reached = await asyncio.gather(*(_reachable(url) for url in urls))
            checks["upstream"] = "ok" if all(reached) else "unreachable"
        return all(outcome == "ok" for outcome in checks.values()), checks


async def _reachable(url: str) -> bool:
    """Whether the URL's host resolves and accepts a TCP connection in time; nothing is sent."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_TIMEOUT)
    except (OSError, TimeoutError) as e:
        log.warning("Readiness: {}:{} not reachable ({})", host, port, type(e).__name__)
        return False
    writer.close()
    return True


async def status(request: Request) -> dict[str, object] | StatusResponse:
    """Liveness: `status` (`Up!` or `Degraded`) and the pipelines served; Hayhooks' whole answer for the operator."""
    answer = await hayhooks_status(request)
    if not is_operator(request):
        return {"status": answer.status, "pipelines": answer.pipelines}
    return answer


def install(app: FastAPI, settings: Settings) -> None:
    """
    Serve `GET /status` and `GET /ready`.

    `/status` goes ahead of Hayhooks' own, which `routes.prune` removes. `/ready` is 200 when ready, else 503 with
    `Retry-After`; its body lists each check's outcome.
    """
    app.add_api_route("/status", status, methods=["GET"], summary="Liveness: the server is up")
    move_ahead(app)
    readiness = Readiness(app)

    async def ready(request: Request) -> JSONResponse:
        is_ready, checks = await readiness.check()
        headers = {"Cache-Control": "no-store", **({} if is_ready else {"Retry-After": "5"})}
        return JSONResponse({"ready": is_ready, "checks": checks}, 200 if is_ready else 503, headers)

    app.add_api_route("/ready", ready, methods=["GET"], summary="Readiness: can the server serve an image now")
