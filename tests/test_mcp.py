"""The MCP door through a real server, driven by the official `mcp` SDK client over streamable HTTP."""

import base64
import io
import json
import urllib.error
import urllib.request

import httpx
import openai
import pytest
from conftest import post_raw, running, server_env, start_server, stop_server
from fake_upstream import Fault
from fastapi.testclient import TestClient
from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client
from PIL import Image

from image_generation_server.app import create_app

KEY = "mcp-door-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPERATOR_TOKEN = "mcp-operator-token-0123456789abcdef"


@pytest.fixture(scope="module")
def mcp_server(upstream, tmp_path_factory):
    env = server_env(
        IMAGE_GENERATION_ENDPOINT=upstream.url, IMAGE_GENERATION_API_KEYS=KEY, HAYHOOKS_TRACING_TOKEN=OPERATOR_TOKEN
    )
    with running(tmp_path_factory.mktemp("mcp"), env) as server:
        yield server


async def session_call(server, action, headers=AUTH):
    """Open an MCP session on the server's `/mcp`, initialize it, and return `action(session)`'s result."""
    async with (
        httpx.AsyncClient(headers=headers, timeout=60) as http,
        streamable_http_client(f"{server.url}/mcp", http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        return await action(session)


async def test_lists_generate_image_with_its_limits(mcp_server):
    listed = await session_call(mcp_server, lambda session: session.list_tools())
    assert [tool.name for tool in listed.tools] == ["generate_image", "edit_image"]  # edit_image: test_image_edits
    tool = listed.tools[0]
    assert "seed" in tool.description
    schema = tool.inputSchema
    assert schema["required"] == ["prompt"]
    assert schema["additionalProperties"] is False
    assert (schema["properties"]["n"]["minimum"], schema["properties"]["n"]["maximum"]) == (1, 10)
    width = schema["properties"]["width"]["anyOf"][0]
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (64, 2048, 8)


async def test_call_returns_the_images_themselves(mcp_server, fresh_upstream):
    arguments = {"prompt": "a kite over the sea", "width": 128, "height": 64, "seed": 5, "n": 2}
    result = await session_call(mcp_server, lambda session: session.call_tool("generate_image", arguments))

    assert not result.isError
    *images, text = result.content
    assert [type(item) for item in images] == [types.ImageContent, types.ImageContent]
    for image in images:
        assert image.mimeType == "image/png"
        picture = Image.open(io.BytesIO(base64.b64decode(image.data)))
        assert (picture.format, picture.size) == ("PNG", (128, 64))
    assert images[0].data != images[1].data
    assert isinstance(text, types.TextContent)
    assert text.text == "seed 5, 6; size 128x64; model black-forest-labs/FLUX.1-schnell"
    # The same pipeline as the native route: seed 6 alone there is the second image.
    body = json.dumps({"prompt": "a kite over the sea", "width": 128, "height": 64, "seed": 6}).encode()
    status, _, png = post_raw(mcp_server, body, AUTH)
    assert (status, png) == (200, base64.b64decode(images[1].data))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"prompt": "x", "width": 100}, "width: Input should be a multiple of 8"),
        ({"prompt": "x", "n": 11}, "n: Input should be less than or equal to 10"),
        ({"prompt": "x", "sed": 3}, "unknown field 'sed'"),
        ({"prompt": "x", "model": "https://attacker.example/steal"}, "model must be a Hugging Face Hub model id"),
        ({"width": 64}, "prompt: Field required"),
        ({"prompt": "   "}, "prompt must be a non-empty string"),
    ],
)
async def test_bad_arguments_are_tool_errors_that_cost_nothing(mcp_server, fresh_upstream, arguments, message):
    result = await session_call(mcp_server, lambda session: session.call_tool("generate_image", arguments))
    assert result.isError
    [text] = result.content
    assert message in text.text
    assert fresh_upstream.requests == []


async def test_upstream_failure_is_a_tool_error_with_the_http_message(mcp_server, fresh_upstream):
    fresh_upstream.fail_next(Fault(status=429, headers={"Retry-After": "7"}))
    arguments = {"prompt": "busy", "width": 64, "height": 64}
    result = await session_call(mcp_server, lambda session: session.call_tool("generate_image", arguments))
    assert result.isError
    assert result.content[0].text == "the upstream is rate limiting, retry later"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["no-key", "wrong-key"])
def test_api_keys_apply(mcp_server, fresh_upstream, headers):
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    request = urllib.request.Request(
        f"{mcp_server.url}/mcp", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream", **headers},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    assert refused.value.headers["WWW-Authenticate"] == "Bearer"


def test_a_dns_rebound_host_is_refused(mcp_server):
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    request = urllib.request.Request(
        f"{mcp_server.url}/mcp", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                 "Host": "attacker.example", **AUTH},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code in (400, 421)


@pytest.mark.parametrize("durable", [False, True], ids=["live", "durable"])
def test_the_bind_address_is_answered_by_mcp_as_by_every_route(hayhooks_settings, monkeypatch, durable):
    """`HAYHOOKS_HOST=10.0.0.5` passed the guard's Host check and was refused by the MCP SDK's own (issue 21)."""
    monkeypatch.setattr(hayhooks_settings, "host", "10.0.0.5")
    monkeypatch.setattr(hayhooks_settings, "durable_mode", durable)
    monkeypatch.setattr(hayhooks_settings, "cors_allow_origins", [])  # no origin but the server's own
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    accept = {"Accept": "application/json, text/event-stream"}
    with TestClient(create_app(), base_url="http://10.0.0.5:1416") as client:
        listed = client.post("/mcp", json=body, headers=accept)
        assert listed.status_code == 200, listed.text
        assert "generate_image" in [tool["name"] for tool in listed.json()["result"]["tools"]]
        assert client.get("/status").status_code == 200
        for other in ("10.0.0.6", "attacker.example"):  # one allow-list: refused by the guard on every route
            assert client.post("/mcp", json=body, headers={**accept, "Host": other}).status_code == 400
            assert client.get("/status", headers={"Host": other}).status_code == 400
        cross_site = {**accept, "Origin": "https://attacker.example"}
        assert client.post("/mcp", json=body, headers=cross_site).status_code == 403


def test_hayhooks_own_mcp_tool_is_off(mcp_server):
    operator = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}  # Hayhooks' whole /status is the operator's
    with urllib.request.urlopen(urllib.request.Request(f"{mcp_server.url}/status", headers=operator)) as response:
        status = json.load(response)
    [deployment] = [d for d in status["deployments"] if d["name"] == "image_generation"]
    assert "run_api" in deployment["capabilities"]
    assert "mcp_eligible" not in deployment["capabilities"]  # `hayhooks mcp run` offers no tool that loses the image


async def test_the_doors_in_durable_mode(upstream, fresh_upstream, tmp_path):
    """The container runs Hayhooks' durable mode: the MCP and OpenAI doors find the same pipeline there."""
    env = server_env(IMAGE_GENERATION_ENDPOINT=upstream.url, HAYHOOKS_DURABLE_MODE="true")
    server = start_server(tmp_path, env)
    try:
        arguments = {"prompt": "durable", "width": 64, "height": 64, "seed": 1}
        result = await session_call(server, lambda session: session.call_tool("generate_image", arguments), {})
        assert not result.isError, result.content
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
            images = await client.images.generate(prompt="durable", size="64x64", extra_body={"seed": 1})
        assert images.data[0].b64_json == result.content[0].data
    finally:
        stop_server(server)


def test_a_malformed_call_is_one_short_line_in_our_log(mcp_server):
    """Issue 22: each malformed call logged ~6 KB at WARNING, with pieces of the prompt, outside our log format."""
    marker = "MALFORMED-PROMPT-MARKER"
    before = len(mcp_server.log())
    call = {
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "generate_image", "arguments": [f"{marker} " * 100]},
    }  # fmt: skip
    headers = {**AUTH, "Accept": "application/json, text/event-stream"}
    request = urllib.request.Request(
        f"{mcp_server.url}/mcp", data=json.dumps(call).encode(), headers={"Content-Type": "application/json", **headers}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("application/json")  # no progressToken: plain JSON
        answer = json.load(response)
    assert answer["error"]["code"] == -32602  # the client is told

    logged = mcp_server.log()[before:]
    assert marker not in logged
    lines = [line for line in logged.splitlines() if "/mcp" not in line]
    assert len(lines) == 1, logged
    assert " | INFO     | " in lines[0] and lines[0].endswith("MCP: refused a malformed request")
