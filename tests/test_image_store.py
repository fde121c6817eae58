"""
The image store, attacked as issue 22 found it: a folder someone else made or linked, links planted under an image's
name, files of others beside ours, a byte budget outrun by concurrent writers, a store that cannot write.

The servers are real (`image-generation-server` against the fake upstream); the clients are the OpenAI SDK and
plain HTTP, without a key for `/images` (the URL is the capability).
"""

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import SERVER, exchange, running, server_env, start_server
from jobs_client import JOBS, call, durable_env, submit, wait_status
from openai import OpenAI

from image_generation_server.image_store import DIR_ENV, NAME, ImageStore, default_directory
from image_generation_server.settings import load_settings

ID = "0123456789abcdef0123456789abcdef"
SECRET = "store-test-secret-that-must-never-be-served"
BUDGET = 3_000_000  # about six 512² images of the fake upstream (470 KB each)


def stored_bytes(folder: Path) -> int:
    total = 0
    for entry in os.scandir(folder):
        try:
            total += entry.stat(follow_symlinks=False).st_size if NAME.fullmatch(entry.name) else 0
        except FileNotFoundError:  # evicted while we looked
            pass
    return total


@pytest.fixture(scope="module")
def store_server(upstream, tmp_path_factory):
    """A server whose store has a small budget, and a secret in its environment."""
    tmp = tmp_path_factory.mktemp("store-server")
    env = server_env(
        IMAGE_GENERATION_ENDPOINT=upstream.url,
        IMAGE_GENERATION_IMAGE_DIR=str(tmp / "images"),
        IMAGE_GENERATION_IMAGE_BYTES=str(BUDGET),
        IMAGE_GENERATION_CACHE_BYTES="0",
        STORE_TEST_SECRET=SECRET,
    )
    with running(tmp, env) as server:
        server.image_dir = tmp / "images"
        yield server


# --- The folder: ours, private, refused otherwise ----------------------------------------------------------------


def test_the_default_folder_is_the_users_own_and_private(tmp_path, monkeypatch):
    """Not a guessable path in a shared /tmp: the user's cache folder, made 0700."""
    monkeypatch.delenv(DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    store = ImageStore.from_settings(load_settings())
    assert store.directory == default_directory() == tmp_path / "cache" / "image-generation" / "images"
    assert store.directory.stat().st_mode & 0o777 == 0o700
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_directory() == Path.home() / ".cache" / "image-generation" / "images"


def foreign_folder(tmp_path: Path) -> Path:
    """A folder another user owns: made and given away when the tests run as root, else the root folder."""
    if os.geteuid() != 0:
        return Path("/")
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    return folder


@pytest.mark.parametrize("kind", ["link", "foreign"])
def test_a_linked_or_foreign_folder_is_refused_at_startup(tmp_path, kind):
    """The server does not start, says which setting to fix, and touches nothing in the folder."""
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (target / "keep.txt").write_text("keep")
    old = time.time() - 30 * 24 * 3600
    os.utime(target / "keep.txt", (old, old))
    folder = tmp_path / "images" if kind == "link" else foreign_folder(tmp_path)
    if kind == "link":
        folder.symlink_to(target)
    with pytest.raises(RuntimeError, match="exited") as refused:
        start_server(tmp_path, server_env(**{DIR_ENV: str(folder)}), timeout=60)
    message = str(refused.value)
    assert f"{DIR_ENV}={str(folder)!r}" in message
    assert ("is a symbolic link" if kind == "link" else "not to the server's user") in message
    assert "Traceback" not in message
    assert (target / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("kind", ["group-writable", "world-writable", "file", "link to a file"])
def test_a_folder_others_may_write_or_not_a_folder_is_refused(tmp_path, kind):
    folder = tmp_path / "images"
    if kind == "file":
        folder.write_text("x")
    elif kind == "link to a file":
        (tmp_path / "file").write_text("x")
        folder.symlink_to(tmp_path / "file")
    else:
        folder.mkdir(mode=0o700)
        folder.chmod(0o770 if kind == "group-writable" else 0o703)
    reason = {"file": "is not a folder", "link to a file": "is a symbolic link"}.get(
        kind, "is writable by group or others"
    )
    with pytest.raises(ValueError, match=f"^{DIR_ENV}=.* {reason}"):
        ImageStore(folder, max_bytes=1000, max_age_seconds=60)


# --- Reads: no link followed, regular files only, streamed with nosniff -------------------------------------------


def test_planted_links_serve_nothing_and_are_not_followed(store_server, tmp_path):
    """The issue's attack: names of images linked to the server's environment and to a file elsewhere."""
    elsewhere = tmp_path / "passwd"
    elsewhere.write_text("root:x:0:0:elsewhere\n")
    planted = {
        f"{ID}.png": Path("/proc/self/environ"),
        f"{ID[::-1]}.png": elsewhere,
        f"{'a' * 32}.jpeg": Path("/etc/passwd"),
    }
    for name, target in planted.items():
        (store_server.image_dir / name).symlink_to(target)
    fifo = f"{'b' * 32}.webp"
    os.mkfifo(store_server.image_dir / fifo)  # not a regular file: no answer may block on it
    for name in [*planted, fifo]:
        for method in ("GET", "HEAD"):
            status, _, body = exchange(store_server, method, f"/images/{name}")
            assert status == 404, (name, method)
            assert SECRET.encode() not in body and b"root:" not in body
    assert elsewhere.read_text() == "root:x:0:0:elsewhere\n"


def test_an_image_is_streamed_with_nosniff_and_answers_head(store_server, fresh_upstream):
    client = OpenAI(base_url=f"{store_server.url}/v1", api_key="unused", max_retries=0)
    (item,) = client.images.generate(prompt="streamed", size="1024x1024", response_format="url").data
    path = item.url.removeprefix(store_server.url)
    status, headers, body = exchange(store_server, "GET", path)
    assert status == 200
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["content-type"] == "image/png"
    assert int(headers["content-length"]) == len(body) == (store_server.image_dir / Path(path).name).stat().st_size
    assert len(body) > 256 * 1024  # more than one chunk
    head_status, head_headers, head_body = exchange(store_server, "HEAD", path)
    assert (head_status, head_body) == (200, b"")
    assert head_headers["content-length"] == headers["content-length"]
    assert head_headers["etag"] == headers["etag"]
    assert head_headers["x-content-type-options"] == "nosniff"


# --- The sweeper and the budget ----------------------------------------------------------------------------------


def test_the_sweeper_leaves_other_files_alone(tmp_path):
    """Only the names the store makes: not other files, not links under our names, not what a link points to."""
    folder = tmp_path / "images"
    store = ImageStore(folder, max_bytes=1, max_age_seconds=60)
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"o" * 1000)
    others = ["notes.txt", f"{ID}.png.bak", f"{ID.upper()}.png", "sub"]
    for name in others[:3]:
        (folder / name).write_bytes(b"x" * 1000)
    (folder / "sub").mkdir()
    (folder / "sub" / f"{ID}.png").write_bytes(b"x")
    (folder / f"{ID}.png").symlink_to(outside)
    ours = [f"{'c' * 32}.png", f"{'d' * 32}.part"]
    for name in ours:
        (folder / name).write_bytes(b"x" * 1000)
    old = time.time() - 30 * 24 * 3600
    for entry in folder.iterdir():
        os.utime(entry, (old, old), follow_symlinks=False)
    assert store.sweep() == 2  # our old image, and our stale partial write
    assert sorted(entry.name for entry in folder.iterdir()) == sorted([*others, f"{ID}.png"])
    assert outside.read_bytes() == b"o" * 1000
    assert (folder / "sub" / f"{ID}.png").exists()


def test_the_budget_holds_at_write_time(tmp_path):
    """Room is made before an image is written: the oldest go first; an image over the whole budget is refused."""
    store = ImageStore(tmp_path / "images", max_bytes=2500, max_age_seconds=3600)
    stored = []
    for i in range(4):
        stored.append(store.put(bytes([i]) * 1000, "png"))
        assert stored_bytes(store.directory) <= 2500
        time.sleep(0.01)  # distinct modification times: the oldest is known
    assert [store.read(f"{image.id}.png") is not None for image in stored] == [False, False, True, True]
    with pytest.raises(Exception, match="larger than the image store's budget"):
        store.put(b"x" * 2501, "png")


def test_the_store_never_holds_more_than_its_budget_under_concurrent_writers(store_server, fresh_upstream):
    """8 clients at once, each asking for 10 images as URLs: the folder stays within its budget all along."""
    stop, peak = threading.Event(), [0]

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], stored_bytes(store_server.image_dir))
            time.sleep(0.002)

    def client(i: int) -> int:
        openai = OpenAI(base_url=f"{store_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        return len(openai.images.generate(prompt=f"writer {i}", n=10, size="512x512", response_format="url").data)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(client, range(8))) == [10] * 8
    finally:
        stop.set()
        watcher.join()
    one_image = max(entry.stat().st_size for entry in store_server.image_dir.iterdir())
    assert peak[0] <= BUDGET + one_image, (peak[0], BUDGET)
    assert stored_bytes(store_server.image_dir) <= BUDGET


# --- A store that cannot write: a 503 in each door's shape -------------------------------------------------------


def test_a_store_that_cannot_write_is_a_503_in_each_doors_shape(upstream, fresh_upstream, tmp_path):
    env = server_env(
        **durable_env(),
        IMAGE_GENERATION_ENDPOINT=upstream.url,
        IMAGE_GENERATION_IMAGE_DIR=str(tmp_path / "images"),
        IMAGE_GENERATION_CACHE_BYTES="0",
    )
    # The server may write no file over 200 KiB (the store's 512² images are 470 KB): such writes fail with EFBIG.
    with running(tmp_path, env, command=["bash", "-c", f"ulimit -f 200 && exec {SERVER}"]) as server:
        openai_body = {"prompt": "unwritable", "size": "512x512", "response_format": "url"}
        status, headers, body = call(f"{server.url}/v1/images/generations", "POST", openai_body)
        assert status == 503, body
        assert headers["retry-after"]
        error = json.loads(body)["error"]
        assert error["type"] == "server_error" and "Error" not in error["message"]

        job = submit(server.url, {"prompt": "unwritable", "width": 512, "height": 512})
        failed = wait_status(server.url, job["execution_id"], {"failed"})
        assert failed["error"]["type"] == "ImageStoreUnavailableError"
        assert "FileExistsError" not in json.dumps(failed) and "OSError" not in json.dumps(failed)
        assert call(f"{server.url}{JOBS}/executions/{job['execution_id']}")[0] == 200
        assert list((tmp_path / "images").iterdir()) == []  # no partial file left behind
