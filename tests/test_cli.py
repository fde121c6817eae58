"""Hayhooks' own CLI (a client we did not write) against a real server: what the README tells CLI users to run."""

import base64
import io
import json
import os
import subprocess

import requests
import rich.errors
import rich.markup
from conftest import HAYHOOKS
from PIL import Image


def hayhooks(server, *args: str) -> subprocess.CompletedProcess:
    port = server.url.rsplit(":", 1)[1]
    env = {**os.environ, "HAYHOOKS_HOST": "127.0.0.1", "HAYHOOKS_PORT": port, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run(
        [str(HAYHOOKS), "pipeline", *args], env=env, capture_output=True, timeout=120, check=False, errors="replace"
    )


def test_cli_runs_the_json_variant(server, fresh_upstream):
    assert "image_generation_json" in server.pipelines  # deployed at startup from served/
    run = hayhooks(server, "run", "image_generation_json", "-p", "prompt=a cat", "-p", "width=64", "-p", "height=64")
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.split("Result:", 1)[1])
    [image] = result["text_to_image"]["images"]
    picture = Image.open(io.BytesIO(base64.b64decode(image["base64_image"])))
    assert (picture.format, picture.size) == ("PNG", (64, 64))
    assert image["meta"]["seed"] == fresh_upstream.requests[0].payload["parameters"]["seed"]


def test_cli_on_the_native_route_prints_the_image_bytes_as_text(server, fresh_upstream):
    """
    Hayhooks' CLI decodes any reply that is not JSON as text and prints it as rich markup (docs/api.md: CLI).

    Image bytes that happen to read as a markup tag (`[/x]`) make rich raise `MarkupError`: the seed is one whose
    image the server answers (the same bytes for the same seed) as text rich can print, so the run must succeed.
    """
    params = {"prompt": "a cat", "width": 64, "height": 64}
    seed = next(seed for seed in range(50) if printable(server, {**params, "seed": seed}))
    run = hayhooks(server, "run", "image_generation", *(arg for k, v in {**params, "seed": seed}.items()
                                                        for arg in ("-p", f"{k}={v}")))  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "PNG" in run.stdout


def printable(server, body: dict) -> bool:
    """Whether the image the server answers for `body`, decoded as the CLI decodes it, prints as rich markup."""
    response = requests.post(f"{server.url}/image_generation/run", json=body, timeout=30)
    assert response.status_code == 200
    try:
        rich.markup.render(response.text)
    except rich.errors.MarkupError:
        return False
    return True
