"""
Every command and code block of README.md and docs/*.md, read from the files and run: examples that cannot rot.

- `bash` blocks run in bash (`-euo pipefail`) in an empty folder, against a real server on the fake upstream,
  started as `serve.sh` starts it (durable mode). `http://localhost:1416` in a block becomes that server's address.
- A `bash` block that runs `./scripts/serve.sh` is run as written, from a copy of the checkout's layout, on a free
  port; the test waits for serve.sh to print the page's URL, then loads the page and generates an image.
- `python` blocks run in `.venv-clients` (made by `scripts/test.sh` from `tests/doc-clients.txt`): the current
  releases of the `openai` and `mcp` SDKs, installed apart from the server, as a user would have them.
- Any other block, or one that cannot run here, carries `<!-- not-run: the reason -->` on the line just before its
  fence, and is reported as skipped with that reason. A block in another language without the marker fails.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, free_port, running, server_env
from PIL import Image

from image_generation_server.demo_upstream import draw

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(?P<reason>\S.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
LOCAL_URL = re.compile(r"(?:https?://)?(?:localhost|127\.0\.0\.1):1416")
CLIENTS_PYTHON = ROOT / ".venv-clients" / "bin" / "python"
TIMEOUT = 120


@dataclass
class Block:
    """One fenced block: where it is, its language and text, and the reason it is not run (if marked)."""

    path: Path
    line: int
    lang: str
    code: str
    not_run: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def starts_the_server(self) -> bool:
        return "./scripts/serve.sh" in self.code


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, in order."""
    found, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = NOT_RUN.match(lines[i - 1]) if i else None
        code = "\n".join(lines[i + 1 : end]) + "\n"
        found.append(Block(path, i + 1, fence["lang"], code, marker["reason"] if marker else None))
        i = end + 1
    return found


ALL = [block for path in DOCUMENTS for block in blocks(path)]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def docs_server(upstream, tmp_path_factory) -> Iterator:
    """The server as serve.sh runs it (durable mode, so the job examples work), on the fake upstream."""
    tmp = tmp_path_factory.mktemp("docs-server")
    env = server_env(IMAGE_GENERATION_ENDPOINT=upstream.url, HAYHOOKS_DURABLE_MODE="true", TMPDIR=str(tmp))
    with running(tmp, env) as server:
        yield server


def _run(argv: list[str], code: str, cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run(
        argv, input=code, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert done.returncode == 0, f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"


def _checkout_layout(into: Path) -> None:
    """`into` looks like the checkout (links to its files) plus `.venv` = the test environment, so that the
    blocks' relative paths (`./scripts/...`, `.venv/bin/...`) work from a folder where they may write files."""
    for entry in ROOT.iterdir():
        if entry.name not in {".git", ".venv", "test-artifacts"}:
            (into / entry.name).symlink_to(entry)
    (into / ".venv").symlink_to(Path(sys.prefix))


def _run_serve_block(block: Block, upstream, tmp_path: Path) -> None:
    """Run the block (it starts serve.sh) until serve.sh says the page is up, then use the page and /run."""
    port = free_port()
    env = server_env(
        SERVE_VENV=sys.prefix,  # the test environment: serve.sh installs nothing into it
        HAYHOOKS_PORT=str(port),
        IMAGE_GENERATION_ENDPOINT=upstream.url,  # what the block's HF_TOKEN would reach: the fake, never Hugging Face
        PYTHONPATH=str(ROOT),
        TMPDIR=str(tmp_path),
    )
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", block.code], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        page = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + TIMEOUT
        while f"serve.sh: up: open {page}" not in log_path.read_text(errors="replace"):
            assert process.poll() is None, f"serve.sh exited with {process.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"serve.sh never printed the page's URL:\n{log_path.read_text()}"
            time.sleep(0.2)
        with urllib.request.urlopen(page, timeout=10) as r:
            assert r.status == 200 and b"<form" in r.read()
        body = b'{"prompt": "A cat sitting on a rainbow", "width": 256, "height": 256, "seed": 42}'
        request = urllib.request.Request(f"{page}image_generation/run", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            image = Image.open(io.BytesIO(r.read())).convert("RGB")
        if "--demo" in block.code:  # the labelled test pattern, pixel for pixel
            assert image.tobytes() == draw("A cat sitting on a rainbow", 42, 256, 256).tobytes()
            _readme_curl_draws_the_demo_pattern(page.rstrip("/"), tmp_path)
        else:
            assert image.size == (256, 256)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _readme_curl_draws_the_demo_pattern(server_url: str, tmp_path: Path) -> None:
    """The README's first curl example, run against the demonstration, saves the labelled test pattern it asked for."""
    [curl] = [b for b in blocks(ROOT / "README.md") if "curl" in b.code and "/image_generation/run " in b.code][:1]
    folder = tmp_path / "curl"
    folder.mkdir()
    _run(["bash", "-euo", "pipefail"], LOCAL_URL.sub(server_url, curl.code), folder, server_env())
    asked = json.loads(re.search(r"-d '(\{.*?\})'", curl.code.replace("\\\n", " "))[1])
    [saved] = list(folder.iterdir())
    expected = draw(asked["prompt"], asked["seed"], asked["width"], asked["height"])
    assert Image.open(saved).convert("RGB").tobytes() == expected.tobytes()


@pytest.mark.parametrize("block", ALL, ids=[b.id for b in ALL])
def test_block_runs(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if block.not_run is not None:
        pytest.skip(f"marked not-run: {block.not_run}")
    assert block.lang in ("bash", "python"), (
        f"a ```{block.lang} block cannot be run: mark it with <!-- not-run: the reason --> on the line before it"
    )
    if block.lang == "bash" and block.starts_the_server():
        _run_serve_block(block, request.getfixturevalue("upstream"), tmp_path)
        return
    server = request.getfixturevalue("docs_server")
    port = server.url.rsplit(":", 1)[1]
    code = LOCAL_URL.sub(server.url, block.code).replace("HAYHOOKS_PORT=1416", f"HAYHOOKS_PORT={port}")
    _checkout_layout(tmp_path)
    env = server_env(TMPDIR=str(tmp_path), HAYHOOKS_HOST="127.0.0.1", PYTHONPATH=str(ROOT))
    if block.lang == "bash":
        _run(["bash", "-euo", "pipefail"], code, tmp_path, env)
        return
    if not CLIENTS_PYTHON.exists():
        _unavailable(f"no {CLIENTS_PYTHON.relative_to(ROOT)}: scripts/test.sh makes it from tests/doc-clients.txt")
    _run([str(CLIENTS_PYTHON), "-"], code, tmp_path, env)


def test_every_marker_belongs_to_a_block() -> None:
    """A marker that no longer sits right before a fence would silently stop skipping, or skip the wrong block."""
    for path in DOCUMENTS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("<!--") and "not-run" in line:
                assert NOT_RUN.match(line), f"{path.relative_to(ROOT)}:{i + 1}: malformed marker {line!r}"
                assert i + 1 < len(lines) and FENCE.match(lines[i + 1]), (
                    f"{path.relative_to(ROOT)}:{i + 1}: the marker is not on the line just before a fence"
                )


def test_readme_links_every_docs_page_and_fits_a_few_screens() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
    assert "../shared" not in readme


def test_curl_examples_fail_on_http_errors() -> None:
    """curl exits 0 on a 4xx and saves the error as the image: every curl that sends a request says --fail-with-body."""
    for block in ALL:
        for command in block.code.replace("\\\n", " ").splitlines():
            if re.search(r"(^|[\s($])curl\s", command.split("#")[0]):
                assert "--fail-with-body" in command, f"{block.id}: {command.strip()}"


def test_the_clients_are_current_releases() -> None:
    """The examples are run with the releases `tests/doc-clients.txt` pins; .venv-clients holds exactly those."""
    if not CLIENTS_PYTHON.exists():
        _unavailable("no .venv-clients: scripts/test.sh makes it")
    pins = [line for line in (ROOT / "tests/doc-clients.txt").read_text().splitlines() if "==" in line]
    for pin in pins:
        name, version = pin.split("#")[0].strip().split("==")
        done = subprocess.run(
            [str(CLIENTS_PYTHON), "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert done.stdout.strip() == version, f"{name} {done.stdout.strip()} in .venv-clients, {version} pinned"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_pages_lead_somewhere() -> None:
    """Every relative link of README.md and docs/ names a file that exists and, with a #fragment, a heading of it."""
    for path in DOCUMENTS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, fragment = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            assert linked.exists(), f"{path.relative_to(ROOT)}: {target} leads nowhere"
            if fragment and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", linked.read_text(), flags=re.DOTALL), re.M)
                assert fragment in {_anchor(h) for h in headings}, f"{path.relative_to(ROOT)}: no heading for {target}"
