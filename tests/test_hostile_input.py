"""Hostile input and access control through the real server: clear 4xx answers, nothing sent upstream."""

import http.client
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import post, post_raw, running, server_env

SMALL = {"prompt": "hostile", "width": 64, "height": 64}


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (json.dumps({**SMALL, "padding": "a" * 100_000}).encode(), 413),
        (json.dumps({"prompt": "a" * 1_000_000}).encode(), 413),
        (json.dumps({**SMALL, "prompt": "a" * 2001}).encode(), 422),
        (b'{"prompt": "lone \\ud800 surrogate", "width": 64, "height": 64}', 422),
        (b'{"prompt": "x", "guidance_scale": 1e400}', 422),
        (b'{"prompt": "x", "guidance_scale": NaN}', 422),
        (json.dumps({**SMALL, "model": "m" * 10_000}).encode(), 422),
        (json.dumps({**SMALL, "prompt": "line\x1b[31mred"}).encode(), 422),
        (json.dumps({**SMALL, "prompt": "nul\x00byte"}).encode(), 422),
        (json.dumps({**SMALL, "negative_prompt": "\x85next line"}).encode(), 422),
        (json.dumps({**SMALL, "width": 64.0}).encode(), 422),
        (json.dumps({**SMALL, "seed": 1.5}).encode(), 422),
        (json.dumps({**SMALL, "seed": True}).encode(), 422),
        (json.dumps({**SMALL, "num_inference_steps": "4"}).encode(), 422),
        (json.dumps({**SMALL, "guidance_scale": 51}).encode(), 422),
        (json.dumps({**SMALL, "model": "a/b/c"}).encode(), 422),
        (json.dumps({**SMALL, "prompt": ["a", "list"]}).encode(), 422),
        (json.dumps(["not", "an", "object"]).encode(), 422),
        (b'{"prompt": "x", "seed": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", 422),
        (b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}", 422),
        (b'{"prompt": "\xff\xfe invalid utf-8"}', 422),
        (json.dumps({**SMALL, "steps": 4}).encode(), 422),
        (json.dumps({**SMALL, "x" * 5000: 1}).encode(), 422),
        (b'{"prompt": "unterminated', 422),
        (b"", 422),
    ],
)
def test_hostile_body_is_refused_without_an_upstream_call(server, fresh_upstream, body, status):
    code, _, answer = post_raw(server, body)
    assert code == status, answer[:300]
    assert fresh_upstream.requests == []
    assert len(answer) < 10_000  # errors never echo a huge input back


def test_unknown_fields_are_named_in_fastapi_shaped_errors(server, fresh_upstream):
    code, _, answer = post(server, {**SMALL, "steps": 4, "cfg": 7})
    assert code == 422
    errors = json.loads(answer)["detail"]
    assert [(e["type"], e["loc"]) for e in errors] == [("extra_forbidden", ["body", n]) for n in ("cfg", "steps")]
    assert fresh_upstream.requests == []


def test_the_published_schema_closes_the_body_to_unknown_fields(server):
    with urllib.request.urlopen(f"{server.url}/openapi.json", timeout=10) as response:
        schema = json.load(response)
    body = schema["paths"]["/image_generation/run"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    model = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    assert model["additionalProperties"] is False
    assert {"prompt", "width", "height", "seed"} <= set(model["properties"])


def test_chunked_body_over_the_cap_is_refused_while_reading(server, fresh_upstream):
    """No Content-Length: the cap applies to the bytes as they arrive; the rest is read and dropped."""
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = (json.dumps({**SMALL, "prompt": "a" * 1000}).encode() for _ in range(500))  # 0.5 MB
    connection.request("POST", "/image_generation/run", chunks, {"Content-Type": "application/json"},
                       encode_chunked=True)  # fmt: skip
    response = connection.getresponse()
    assert response.status == 413
    assert "65536 bytes" in response.read().decode()
    assert fresh_upstream.requests == []


def test_a_client_that_expects_100_continue_is_refused_before_it_sends(server, fresh_upstream, tmp_path):
    big = tmp_path / "big.json"
    big.write_text(json.dumps({**SMALL, "prompt": "a" * 5_000_000}))
    done = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_upload}", "-H", "Expect: 100-continue",
         "-H", "Content-Type: application/json", "--data-binary", f"@{big}", f"{server.url}/image_generation/run"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    status, uploaded = done.stdout.split()
    assert status == "413", done.stdout + done.stderr
    assert int(uploaded) < 1_000_000  # curl stopped sending when the answer came
    assert fresh_upstream.requests == []


def test_odd_but_valid_unicode_is_served(server, fresh_upstream):
    prompt = "猫 🐱 on a rainbow \u202eevil\u202c, e\u0301, \u200b zero-width"
    code, _, _ = post(server, {**SMALL, "prompt": prompt})
    assert code == 200
    assert fresh_upstream.requests[0].payload["inputs"] == prompt


def test_prompts_are_logged_only_truncated(server, fresh_upstream):
    marker = "q" * 2000
    assert post(server, {**SMALL, "prompt": marker})[0] == 200
    assert post_raw(server, json.dumps({"prompt": "z" * 60_000}).encode())[0] == 422
    log = server.log()
    assert "q" * 65 not in log
    assert "z" * 65 not in log


@pytest.fixture(scope="module")
def keyed_server(upstream, tmp_path_factory):
    env = server_env(IMAGE_GENERATION_ENDPOINT=upstream.url, IMAGE_GENERATION_API_KEYS="first-key, second-key")
    with running(tmp_path_factory.mktemp("keyed"), env) as server:
        yield server


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        ("Bearer wrong-key", 401),
        ("Basic first-key", 401),
        ("Bearer first-key-but-longer", 401),
        ("Bearer first-key", 200),
        ("Bearer second-key", 200),
    ],
)
@pytest.mark.parametrize("extra", [{}, {"padding": "a" * 100_000}], ids=["small", "over_the_cap"])
def test_api_keys(keyed_server, fresh_upstream, authorization, status, extra):
    """The key is checked first: without it, even a body over the cap is answered 401, unread."""
    headers = {"Authorization": authorization} if authorization else {}
    code, answer_headers, _ = post_raw(keyed_server, json.dumps({**SMALL, **extra}).encode(), headers)
    status = 413 if extra and status == 200 else status
    assert code == status
    assert len(fresh_upstream.requests) == (1 if status == 200 else 0)
    if status == 401:
        assert answer_headers["www-authenticate"] == "Bearer"


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(server, fresh_upstream, tmp_path):
    """Fuzz the published OpenAPI schema of the image route: no answer may be a 5xx."""
    fuzz = subprocess.run(
        [str(Path(sys.executable).with_name("st")), "run", f"{server.url}/openapi.json",
         "--include-path", "/image_generation/run", "--checks", "not_a_server_error",
         "--max-examples", "100", "--seed", "1", "--no-color"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert fuzz.returncode == 0, fuzz.stdout[-3000:]
    assert "passed" in fuzz.stdout
