"""
The image store: generated images kept in a directory (shared by every replica), served at `GET /images/{id}.{ext}`.

Ids are 128 random bits, so an image URL is a capability: whoever holds it may fetch the image, without an API key
(`<img>` tags and OpenAI `url` clients send none), and delete it (`DELETE /images/{id}.{ext}`). A sweeper deletes
images past the age limit, then the oldest ones until the directory fits its byte budget; a deleted (or never
stored) image is a 404.
"""

import asyncio
import contextlib
import os
import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from hayhooks import log
from hayhooks.settings import settings as hayhooks_settings

from components.settings import resolve
from image_generation_server.responses import etag_matches

DIR_ENV = "IMAGE_GENERATION_IMAGE_DIR"
BYTES_ENV = "IMAGE_GENERATION_IMAGE_BYTES"
MAX_AGE_ENV = "IMAGE_GENERATION_IMAGE_MAX_AGE"
DEFAULT_MAX_BYTES = 1024**3
DEFAULT_MAX_AGE_SECONDS = 24 * 3600.0
MAX_SWEEP_INTERVAL_SECONDS = 60.0
FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
NAME = re.compile(r"[0-9a-f]{32}\.(png|jpeg|webp)")


@dataclass(frozen=True)
class StoredImage:
    """Where a stored image is served, and its ETag."""

    id: str
    url: str
    etag: str


class ImageStore:
    """A directory of immutable images named `{id}.{ext}`, bounded in bytes and in age."""

    def __init__(self, directory: Path, max_bytes: int, max_age_seconds: float) -> None:
        if max_bytes <= 0 or max_age_seconds <= 0:
            raise ValueError(f"{BYTES_ENV} and {MAX_AGE_ENV} must be positive")
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds

    @classmethod
    def from_env(cls) -> "ImageStore":
        """The store configured by `IMAGE_GENERATION_IMAGE_DIR`, `_IMAGE_BYTES` and `_IMAGE_MAX_AGE` (seconds)."""
        default_dir = Path(tempfile.gettempdir()) / "image-generation-images"
        return cls(
            resolve(None, DIR_ENV, default_dir, Path),
            resolve(None, BYTES_ENV, DEFAULT_MAX_BYTES, int),
            resolve(None, MAX_AGE_ENV, DEFAULT_MAX_AGE_SECONDS, float),
        )

    def put(self, data: bytes, image_format: str) -> StoredImage:
        """Store the image under a new random id; written whole or not at all."""
        image_id = secrets.token_hex(16)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / f"{image_id}.{image_format}"
        temporary = path.with_suffix(".part")
        temporary.write_bytes(data)
        temporary.replace(path)
        return StoredImage(image_id, f"{hayhooks_settings.root_path}/images/{path.name}", f'"{image_id}"')

    def read(self, name: str) -> bytes | None:
        """The bytes of the image file `name` (`{id}.{ext}`), or None when there is no such image (any more)."""
        if NAME.fullmatch(name) is None:
            return None
        try:
            return (self.directory / name).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> bool:
        """Delete the image file `name` (`{id}.{ext}`); False when there was no such image (any more)."""
        if NAME.fullmatch(name) is None:
            return False
        try:
            (self.directory / name).unlink()
        except FileNotFoundError:
            return False
        return True

    def sweep(self) -> int:
        """Delete images past the age limit, then the oldest until the rest fit the budget; returns how many."""
        try:
            entries = [(entry.stat(), entry.path) for entry in os.scandir(self.directory) if entry.is_file()]
        except FileNotFoundError:
            return 0
        entries.sort(key=lambda item: item[0].st_mtime, reverse=True)  # newest first
        oldest_kept = time.time() - self.max_age_seconds
        kept_bytes, deleted = 0, 0
        for stat, path in entries:
            kept_bytes += stat.st_size
            if stat.st_mtime < oldest_kept or kept_bytes > self.max_bytes:
                with contextlib.suppress(FileNotFoundError):  # another replica swept it first
                    os.unlink(path)
                deleted += 1
        return deleted

    async def sweep_forever(self) -> None:
        """Sweep now, then every so often (a quarter of the age limit, at most a minute apart)."""
        interval = min(MAX_SWEEP_INTERVAL_SECONDS, self.max_age_seconds / 4)
        while True:
            try:
                if deleted := await asyncio.to_thread(self.sweep):
                    log.info("Image store: deleted {} images (age or byte budget)", deleted)
            except OSError as e:
                log.warning("Image store sweep failed: {}", type(e).__name__)
            await asyncio.sleep(interval)


def install(app: FastAPI) -> None:
    """Serve `GET` and `DELETE /images/{id}.{ext}` from the store, and run its sweeper while the app runs."""
    store = ImageStore.from_env()
    app.state.image_store = store

    @app.get("/images/{name}", tags=["images"])
    async def get_image(name: str, request: Request) -> Response:
        """A generated image, by the URL a job result or an OpenAI `url` response gave; 404 once it is deleted."""
        data = await asyncio.to_thread(store.read, name)
        if data is None:
            raise HTTPException(404, "no such image (it may have expired)")
        etag = f'"{name.partition(".")[0]}"'
        headers = {"ETag": etag, "Cache-Control": f"private, max-age={int(store.max_age_seconds)}, immutable"}
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=FORMATS[name.rpartition(".")[2]], headers=headers)

    @app.delete("/images/{name}", tags=["images"], status_code=204)
    async def delete_image(name: str) -> Response:
        """
        Delete a generated image now, before the sweeper would.

        Whoever holds its URL may (the web page does, as soon as the browser has the image); every replica answers 404
        for it from then on.
        """
        if not await asyncio.to_thread(store.delete, name):
            raise HTTPException(404, "no such image (it may have expired)")
        return Response(status_code=204)

    serve = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with serve(app) as state:
            sweeper = asyncio.create_task(store.sweep_forever())
            try:
                yield state
            finally:
                sweeper.cancel()

    app.router.lifespan_context = lifespan
