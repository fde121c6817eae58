"""End to end: a real server process, the fake upstream behind it, and curl in front, as the README does."""

import base64
import io
import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import HAYHOOKS, ROOT, TEST_TOKEN, server_env, start_server, stop_server
from PIL import Image

from components.image_codec import PNG_SIGNATURE


def curl(server, body: dict | str, out: Path, *extra: str) -> dict[str, str]:
    """POST like the README's curl; returns the response headers (lower-case names) plus `status`."""
    data = body if isinstance(body, str) else json.dumps(body)
    headers_file = out.with_suffix(".headers")
    subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{server.url}/image_generation/run", "-H", "Content-Type: application/json",
         "-d", data, "--output", str(out), "-D", str(headers_file), *extra],
        check=True,
    )  # fmt: skip
    lines = headers_file.read_text().strip().splitlines()
    headers = {"status": lines[0].split()[1]}
    headers.update((k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line))
    return headers


def test_readme_curl_downloads_a_png(server, fresh_upstream, tmp_path):
    out = tmp_path / "generated_image.png"
    headers = curl(server, {"prompt": "A cat sitting on a rainbow", "width": 512, "height": 512}, out)

    assert headers["status"] == "200"
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(data))
    assert image.size == (512, 512)
    seed = int(headers["x-seed"])
    assert fresh_upstream.requests[0].payload["parameters"]["seed"] == seed
    assert "parameters" not in image.text  # the prompt stays out unless IMAGE_GENERATION_EMBED_PARAMETERS is on
    assert headers["content-type"] == "image/png"
    assert headers["content-disposition"] == f'inline; filename="image-{seed}.png"'


def test_seed_reproduces_the_image(server, fresh_upstream, tmp_path):
    body = {"prompt": "reproducible", "width": 64, "height": 64, "seed": 1234}
    first = curl(server, body, tmp_path / "a.png")
    again = curl(server, {**body, "prompt": "reproducible, in fog"}, tmp_path / "b.png")  # same seed, other image
    third = curl(server, body, tmp_path / "c.png")

    assert first["x-seed"] == again["x-seed"] == "1234"
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "c.png").read_bytes()
    assert first["etag"] == third["etag"] != again["etag"]
    assert len(fresh_upstream.requests) == 2  # the third came from the cache


def test_negative_prompt_reaches_the_upstream(server, fresh_upstream, tmp_path):
    body = {"prompt": "negative", "width": 64, "height": 64, "seed": 77}
    curl(server, body, tmp_path / "a.png")
    curl(server, {**body, "negative_prompt": "fog"}, tmp_path / "b.png")  # another cache key: not from the cache
    sent = [request.payload["parameters"] for request in fresh_upstream.requests]
    assert [(p.get("negative_prompt"), p["seed"]) for p in sent] == [(None, 77), ("fog", 77)]


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_output_formats(server, fresh_upstream, tmp_path, fmt, pil_format):
    fresh_upstream.image_format = "png"  # forces a conversion for jpeg and webp
    out = tmp_path / f"image.{fmt}"
    headers = curl(server, {"prompt": f"format {fmt}", "width": 128, "height": 96, "output_format": fmt}, out)
    assert headers["content-type"] == f"image/{fmt}"
    image = Image.open(out)
    assert (image.format, image.size) == (pil_format, (128, 96))


@pytest.mark.parametrize(
    "body",
    [
        {"width": 512},
        {"prompt": ""},
        {"prompt": "x" * 2001},
        {"prompt": "x", "width": -5},
        {"prompt": "x", "width": 100000},
        {"prompt": "x", "height": 516},
        {"prompt": "x", "width": 512.0},
        {"prompt": "x", "width": "512"},
        {"prompt": "x", "seed": -1},
        {"prompt": "x", "seed": 4294967296},
        {"prompt": "x", "output_format": "gif"},
        {"prompt": "x", "model": "https://attacker.example/collect"},
        {"prompt": "x", "model": "/etc/passwd"},
        {"prompt": "x", "model": "../secrets"},
        {"prompt": "x", "num_inference_steps": 0},
        {"prompt": "x\x00y"},
    ],
)
def test_bad_input_is_422_and_costs_nothing_upstream(server, fresh_upstream, tmp_path, body):
    headers = curl(server, body, tmp_path / "error.json")
    assert headers["status"] == "422"
    assert fresh_upstream.requests == []


def test_etag_answers_304(server, fresh_upstream, tmp_path):
    body = {"prompt": "cached", "width": 64, "height": 64, "seed": 99}
    etag = curl(server, body, tmp_path / "a.png")["etag"]
    headers = curl(server, body, tmp_path / "b.png", "-H", f"If-None-Match: {etag}")
    assert headers["status"] == "304"
    assert headers["etag"] == etag
    assert not (tmp_path / "b.png").exists()  # curl writes no file for an empty body


def test_no_temp_files_are_left(server, fresh_upstream, tmp_path):
    server_tmp = server.log_path.parent / "tmp"  # the server's TMPDIR
    for i in range(30):
        curl(server, {"prompt": f"no temp files {i}", "width": 64, "height": 64}, tmp_path / "x.png")
    assert list(server_tmp.iterdir()) == []


def post_json_variant(server, body: dict, name: str = "image_generation_json", output: str = "text_to_image") -> dict:
    """POST to a JSON variant's route; the one image of its result's `output`, with its PNG decoded as `data`."""
    request = urllib.request.Request(
        f"{server.url}/{name}/run", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        [image] = json.load(response)["result"][output]["images"]
    return {**image, "data": base64.b64decode(image["base64_image"])}


def test_json_variant_is_served_from_startup_and_guarded(server, fresh_upstream):
    """served/image_generation_json.yml is deployed when the server starts: no deployment route is involved."""
    image = post_json_variant(server, {"prompt": "json variant", "width": 128, "height": 64})
    assert image["data"].startswith(PNG_SIGNATURE)
    assert Image.open(io.BytesIO(image["data"])).size == (128, 64)
    assert image["mime_type"] == "image/png"
    assert image["meta"]["seed"] == fresh_upstream.requests[-1].payload["parameters"]["seed"]

    with pytest.raises(urllib.error.HTTPError) as refused:  # the route is guarded: a typo is not ignored
        post_json_variant(server, {"prompt": "json variant", "width": 128, "height": 64, "sed": 3})
    assert refused.value.code == 422
    assert json.load(refused.value)["detail"][0]["loc"] == ["body", "sed"]


def test_hayhooks_cli_deploys_the_yaml_to_plain_hayhooks_run(upstream, fresh_upstream, tmp_path):
    """The README's local development setup: `hayhooks run` with deployment on, and the CLI's deploy-yaml."""
    env = server_env(
        IMAGE_GENERATION_ENDPOINT=upstream.url,
        HAYSTACK_DESERIALIZATION_ALLOWLIST="components.*",
        HAYHOOKS_STARTUP_DEPLOY_STRATEGY="sequential",  # as the README says
    )
    # A YAML deployed this way runs as it is (the server's settings are applied only by its own loader): the edited
    # YAML names its endpoint.
    edited = tmp_path / "image_generation_dev.yml"
    text = (ROOT / "pipelines" / "image_generation.yml").read_text()
    edited.write_text(text.replace("endpoint_url: null", f"endpoint_url: {upstream.url}", 1))
    hayhooks = start_server(tmp_path, env, command=[str(HAYHOOKS), "run"])
    try:
        deploy = subprocess.run(
            [str(HAYHOOKS), "pipeline", "deploy-yaml", "-n", "image_generation_dev", "--no-save-file", str(edited)],
            cwd=ROOT, env={**env, "HAYHOOKS_PORT": hayhooks.url.rsplit(":", 1)[1]},
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        image = post_json_variant(  # the YAML's output: the marker after the generator
            hayhooks, {"prompt": "json variant", "width": 64, "height": 64}, "image_generation_dev", "ai_image_marker"
        )
        assert image["data"].startswith(PNG_SIGNATURE)
        assert b"trainedAlgorithmicMedia" in image["data"]
    finally:
        stop_server(hayhooks)


def test_token_goes_only_to_the_configured_endpoint(server, fresh_upstream, tmp_path):
    curl(server, {"prompt": "auth", "width": 64, "height": 64}, tmp_path / "a.png")
    [seen] = fresh_upstream.requests
    assert seen.headers["authorization"] == f"Bearer {TEST_TOKEN}"
    assert TEST_TOKEN not in server.log()


def test_a_request_logs_one_line_and_never_its_prompt(server, fresh_upstream, tmp_path):
    """At the default level: the access line only. Hayhooks' per-run lines (they carry the prompt) are DEBUG."""
    prompt = "a lighthouse nobody may read about in the log"
    headers = curl(server, {"prompt": prompt, "width": 64, "height": 64}, tmp_path / "logged.png")
    assert headers["status"] == "200"
    lines = [line for line in server.log().splitlines() if headers["x-request-id"] in line]
    assert len(lines) == 1, lines
    assert '"POST /image_generation/run HTTP/1.1" 200' in lines[0]
    assert "lighthouse" not in server.log()


def test_a_refusal_logs_its_access_line_as_uvicorn_writes_it(server):
    """The access line covers every answer, refusals too, in Uvicorn's words (its quotes in the path escaped)."""
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{server.url}/no-such-route?q=%22quoted%22", timeout=10)
    assert refused.value.code == 404
    [line] = [line for line in server.log().splitlines() if refused.value.headers["x-request-id"] in line]
    assert line.endswith(' - "GET /no-such-route?q=%22quoted%22 HTTP/1.1" 404'), line
    assert "| INFO " in line and "127.0.0.1:" in line
