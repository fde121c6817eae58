"""
The image store: generated images kept in a directory (shared by every replica), served at `GET /images/{id}.{ext}`.

Ids are 128 random bits, so an image URL is a capability: whoever holds it may fetch the image, without an API key
(`<img>` tags and OpenAI `url` clients send none), and delete it (`DELETE /images/{id}.{ext}`). The store is a folder
(`IMAGE_GENERATION_IMAGE_DIR`) the server owns: at startup it refuses a folder that is a link, belongs to another
user, or that group or others may write into, so nobody else can plant a file (or a link to `/proc/self/environ`)
under an image's name. Everything after that goes through the folder opened once, without following links: images
are opened with `O_NOFOLLOW` and served only when they are regular files, streamed from disk in chunks. The store
touches only the names it makes (`{32 hex}.{png,jpeg,webp}`, and `{32 hex}.part` while one is written). Its byte
budget holds when an image is written: the oldest images are deleted first to make room, and an image larger than
the whole budget is refused. A sweeper also deletes images past the age limit; a deleted (or never stored) image is a
404.
"""

import asyncio
import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Request, Response
from hayhooks import log
from hayhooks.settings import settings as hayhooks_settings
from starlette.types import Receive, Scope, Send

from components.errors import ServerBusyError
from image_generation_server.responses import etag_matches
from image_generation_server.settings import Settings, env_name

DIR_ENV = env_name("image_dir")
MAX_SWEEP_INTERVAL_SECONDS = 60.0
STALE_PART_SECONDS = 3600.0  # a `.part` this old was left by a writer that died: the sweeper deletes it
RETRY_AFTER_SECONDS = 5  # what a client is told to wait when the store cannot keep an image
CHUNK_BYTES = 256 * 1024  # an image is sent in chunks of this size, read from disk as the client takes them
FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
NAME = re.compile(r"[0-9a-f]{32}\.(png|jpeg|webp)")
PART = re.compile(r"[0-9a-f]{32}\.part")
# No link followed, no blocking on a FIFO, no fd leaked into a child process.
OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class ImageStoreUnavailableError(ServerBusyError):
    """The store cannot keep an image now: its folder is not writable, or the image is larger than its whole budget."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=RETRY_AFTER_SECONDS)


@dataclass(frozen=True)
class StoredImage:
    """Where a stored image is served, and its ETag."""

    id: str
    url: str
    etag: str


@dataclass(frozen=True)
class OpenImage:
    """A stored image opened for reading: its file descriptor (the caller closes it) and its size."""

    fd: int
    size: int


def default_directory() -> Path:
    """The service user's own cache folder: `$XDG_CACHE_HOME/image-generation/images`, else `~/.cache/...`."""
    cache = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(cache) if cache and Path(cache).is_absolute() else Path.home() / ".cache"
    return base / "image-generation" / "images"


def open_private_folder(directory: Path) -> int:
    """
    Open `directory` (made 0700 if missing) as the store folder, or refuse it: a `ValueError` naming the setting.

    Refused: a link (even to a good folder), something that is not a folder, a folder of another user, a folder that
    group or others may write into. Returns the folder's descriptor, opened without following a link.
    """
    where = f"{DIR_ENV}={str(directory)!r}"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:  # a dangling link, or a file: refused below
        pass
    except OSError as e:
        raise ValueError(f"{where} cannot be created ({os.strerror(e.errno or 0)})") from None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | OPEN_FLAGS)
    except OSError as e:
        if directory.is_symlink():  # O_NOFOLLOW refuses it (ELOOP, or ENOTDIR with O_DIRECTORY): say why
            reason = "is a symbolic link"
        elif e.errno == errno.ENOTDIR:
            reason = "is not a folder"
        else:
            reason = f"cannot be opened ({os.strerror(e.errno or 0)})"
        raise ValueError(f"{where} {reason}: the image store must be a folder of the server's own") from None
    info = os.fstat(fd)
    problem = None
    if info.st_uid != os.geteuid():
        problem = f"belongs to uid {info.st_uid}, not to the server's user (uid {os.geteuid()})"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}; chmod 700 it)"
    if problem is not None:
        os.close(fd)
        raise ValueError(f"{where} {problem}: the image store must be a folder of the server's own")
    return fd


class ImageStore:
    """A folder of immutable images named `{id}.{ext}`, bounded in bytes (when written) and in age (by the sweeper)."""

    def __init__(self, directory: Path, max_bytes: int, max_age_seconds: float) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds
        self._fd = open_private_folder(directory)
        self._lock = threading.Lock()  # the threads of this process; `flock` on the folder orders the replicas

    @classmethod
    def from_settings(cls, settings: Settings) -> "ImageStore":
        """The store the settings `image_dir` (else `default_directory()`), `image_bytes` and `image_max_age` name."""
        return cls(settings.image_dir or default_directory(), settings.image_bytes, settings.image_max_age)

    def put(self, data: bytes, image_format: str) -> StoredImage:
        """
        Store the image under a new random id, written whole or not at all; the oldest images go first to make room.

        :raises ImageStoreUnavailableError: The image is larger than the whole budget, or the folder is not writable.
        """
        if len(data) > self.max_bytes:
            raise ImageStoreUnavailableError("the image is larger than the image store's budget")
        image_id = secrets.token_hex(16)
        name, part = f"{image_id}.{image_format}", f"{image_id}.part"
        try:
            with self._exclusive():
                self._evict(self._entries(), room=len(data))
                self._write(part, data)
                os.replace(part, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(part, dir_fd=self._fd)
            log.warning("Image store: cannot write an image ({})", os.strerror(e.errno or 0))
            raise ImageStoreUnavailableError("the image store cannot keep images now") from None
        return StoredImage(image_id, f"{hayhooks_settings.root_path}/images/{name}", f'"{image_id}"')

    def open(self, name: str) -> OpenImage | None:
        """The image file `name` (`{id}.{ext}`) opened for reading, or None: no such image, or not a regular file."""
        if NAME.fullmatch(name) is None:
            return None
        try:
            fd = os.open(name, os.O_RDONLY | OPEN_FLAGS, dir_fd=self._fd)
        except OSError:  # missing, or a link (ELOOP)
            return None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            return None
        return OpenImage(fd, info.st_size)

    def read(self, name: str) -> bytes | None:
        """The bytes of the image file `name`, or None (as `open`); for tests and tools, the route streams instead."""
        image = self.open(name)
        if image is None:
            return None
        with os.fdopen(image.fd, "rb") as file:
            return file.read()

    def delete(self, name: str) -> bool:
        """Delete the image file `name` (`{id}.{ext}`); False when there was no such image (any more)."""
        if NAME.fullmatch(name) is None:
            return False
        try:
            if not stat.S_ISREG(os.stat(name, dir_fd=self._fd, follow_symlinks=False).st_mode):
                return False  # not one the store made
            os.unlink(name, dir_fd=self._fd)
        except FileNotFoundError:
            return False
        return True

    def sweep(self) -> int:
        """Delete images past the age limit and stale partial writes, then the oldest beyond the budget; how many."""
        with self._exclusive():
            entries = self._entries()
            oldest_kept = time.time() - self.max_age_seconds
            stale = [(name, info) for name, info in entries if info.st_mtime < oldest_kept]
            stale += [
                (name, info) for name, info in self._entries(PART) if info.st_mtime < time.time() - STALE_PART_SECONDS
            ]
            for name, _ in stale:
                self._unlink(name)
            fresh = [(name, info) for name, info in entries if info.st_mtime >= oldest_kept]
            return len(stale) + self._evict(fresh, room=0)

    async def sweep_forever(self) -> None:
        """Sweep now, then every so often (a quarter of the age limit, at most a minute apart)."""
        interval = min(MAX_SWEEP_INTERVAL_SECONDS, self.max_age_seconds / 4)
        while True:
            try:
                if deleted := await asyncio.to_thread(self.sweep):
                    log.info("Image store: deleted {} images (age or byte budget)", deleted)
            except OSError as e:
                log.warning("Image store sweep failed: {}", os.strerror(e.errno or 0))
            await asyncio.sleep(interval)

    @contextlib.contextmanager
    def _exclusive(self) -> Any:
        """Hold the store's lock: one writer or sweeper at a time, across threads and across replicas."""
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _entries(self, pattern: re.Pattern = NAME) -> list[tuple[str, os.stat_result]]:
        """The regular files whose names the store makes (`pattern`), newest first; links and other names ignored."""
        entries = []
        with os.scandir(self._fd) as scan:
            for entry in scan:
                if pattern.fullmatch(entry.name) is None:
                    continue
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile (by a replica without flock)
                    info = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode):
                        entries.append((entry.name, info))
        entries.sort(key=lambda item: item[1].st_mtime, reverse=True)
        return entries

    def _evict(self, newest_first: list[tuple[str, os.stat_result]], room: int) -> int:
        """Delete the oldest images until the rest plus `room` bytes fit the budget; how many were deleted."""
        kept, deleted = room, 0
        for name, info in newest_first:
            kept += info.st_size
            if kept > self.max_bytes:
                self._unlink(name)
                deleted += 1
        return deleted

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._fd)

    def _write(self, name: str, data: bytes) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, 0o600, dir_fd=self._fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


class ImageFileResponse(Response):
    """An open image sent in chunks read from disk as the client takes them (headers only for `HEAD`); closes it."""

    def __init__(self, image: OpenImage, media_type: str, headers: dict[str, str]) -> None:
        super().__init__(media_type=media_type, headers=headers)
        self.image = image
        self.headers["content-length"] = str(image.size)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: D102
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            offset = 0 if scope["method"] != "HEAD" else self.image.size
            while offset < self.image.size:
                chunk = await anyio.to_thread.run_sync(os.pread, self.image.fd, CHUNK_BYTES, offset)
                if not chunk:  # cannot happen to an immutable image; never promise bytes that are not there
                    break
                offset += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": offset < self.image.size})
            if offset == self.image.size:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            os.close(self.image.fd)


def install(app: FastAPI, settings: Settings) -> Callable[[], AbstractAsyncContextManager[None]]:
    """Serve `GET` and `DELETE /images/{id}.{ext}` from the store; returns its sweeper, to run while the app runs."""
    store = ImageStore.from_settings(settings)
    app.state.image_store = store

    @app.get("/images/{name}", tags=["images"])
    async def get_image(name: str, request: Request) -> Response:
        """A generated image, by the URL a job result or an OpenAI `url` response gave; 404 once it is deleted."""
        image = await asyncio.to_thread(store.open, name)
        if image is None:
            raise HTTPException(404, "no such image (it may have expired)")
        etag = f'"{name.partition(".")[0]}"'
        headers = {
            "ETag": etag,
            "Cache-Control": f"private, max-age={int(store.max_age_seconds)}, immutable",
            "X-Content-Type-Options": "nosniff",
        }
        if etag_matches(request.headers.get("if-none-match"), etag):
            os.close(image.fd)
            return Response(status_code=304, headers=headers)
        return ImageFileResponse(image, FORMATS[name.rpartition(".")[2]], headers)

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

    @contextlib.asynccontextmanager
    async def sweeping() -> AsyncIterator[None]:
        """The sweeper, for as long as the app runs (`app.create_app` enters it in the app's one lifespan)."""
        sweeper = asyncio.create_task(store.sweep_forever())
        try:
            yield
        finally:
            sweeper.cancel()

    return sweeping
