"""
What a newcomer meets in the first hour (issue 25), through real servers on the fake upstream: a job that fails says
why, the image store forgets an image when asked, and `model` can only name a model the server serves.
"""

import json
from collections.abc import Iterator

import httpx
import pytest
from conftest import Server, running, server_env
from fake_upstream import Fault
from jobs_client import JOBS, call, durable_env, submit, wait_status
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

DEFAULT_MODEL = "black-forest-labs/FLUX.1-schnell"
BODY = {"prompt": "A cat sitting on a rainbow", "width": 64, "height": 64}


@pytest.fixture(scope="module")
def tokenless_server(upstream, tmp_path_factory) -> Iterator[Server]:
    """serve.sh's setup (durable mode) with an endpoint and no token at all."""
    tmp = tmp_path_factory.mktemp("first-hour")
    env = server_env(**durable_env(), IMAGE_GENERATION_ENDPOINT=upstream.url, TMPDIR=str(tmp))
    del env["HF_TOKEN"]
    with running(tmp, env) as server:
        yield server


@pytest.fixture(scope="module")
def jobs_server(upstream, tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("first-hour-token")
    with running(tmp, server_env(**durable_env(), IMAGE_GENERATION_ENDPOINT=upstream.url, TMPDIR=str(tmp))) as server:
        yield server


def failed_job(server: Server) -> dict:
    job = submit(server.url, BODY)
    return wait_status(server.url, job["execution_id"], {"failed"})


@pytest.mark.parametrize(
    ("fault", "kind", "status", "sentence"),
    [
        (Fault(status=401), "MissingTokenError", 502,
         "the upstream refused the request: the server has no Hugging Face token"),
        (Fault(status=402), "UpstreamQuotaError", 502,
         "the upstream refused the request: the token's account has no credits left"),
        (Fault(status=500), "UpstreamError", 502, "the upstream failed"),
    ],
)  # fmt: skip
def test_a_failed_job_says_why_as_run_does(tokenless_server, fresh_upstream, fault, kind, status, sentence):
    fresh_upstream.fail_next(fault)
    answered, _, body = call(f"{tokenless_server.url}{JOBS}/run", "POST", BODY)
    assert (answered, json.loads(body)) == (status, {"detail": sentence})

    fresh_upstream.fail_next(fault)
    job = failed_job(tokenless_server)
    assert job["error"]["type"] == kind
    [why] = [entry for entry in job["progress"] if entry["kind"] == "failed"]
    assert why["message"] == sentence
    assert why["metadata"] == {"phase": "failed", "error": kind, "status": status, "message": sentence,
                               "retry_after": None}  # fmt: skip


def test_a_refused_token_is_not_a_missing_one(jobs_server, fresh_upstream):
    fresh_upstream.fail_next(Fault(status=403))
    job = failed_job(jobs_server)
    assert job["error"]["type"] == "UpstreamAuthError"
    assert [e["message"] for e in job["progress"] if e["kind"] == "failed"] == ["upstream rejected the credentials"]


def test_a_rate_limited_job_says_when_to_retry(jobs_server, fresh_upstream):
    fresh_upstream.fail_next(Fault(status=429, headers={"Retry-After": "7"}))
    job = failed_job(jobs_server)
    [why] = [e["metadata"] for e in job["progress"] if e["kind"] == "failed"]
    assert (why["status"], why["retry_after"], why["message"]) == (429, 7, "the upstream is rate limiting, retry later")


def test_whoever_holds_an_image_url_can_delete_it(jobs_server, fresh_upstream):
    job = submit(jobs_server.url, BODY)
    done = wait_status(jobs_server.url, job["execution_id"], {"completed"})
    url = jobs_server.url + done["result"]["images"][0]["url"]
    assert call(url)[0] == 200
    assert call(url, "DELETE")[0] == 204  # no key: the URL is the credential, as for GET
    assert call(url)[0] == 404
    assert call(url, "DELETE")[0] == 404
    assert call(jobs_server.url + "/images/not-an-image.png", "DELETE")[0] == 404


async def mcp_call(server: Server, arguments: dict):
    async with (
        httpx.AsyncClient(timeout=60) as http,
        streamable_http_client(f"{server.url}/mcp", http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        return await session.call_tool("generate_image", arguments)


async def test_with_an_endpoint_model_names_only_the_served_model_at_every_door(jobs_server, fresh_upstream):
    for model in ("dall-e-3", "foo/bar", "stabilityai/sdxl-turbo"):
        body = {**BODY, "model": model}
        status, _, answer = call(f"{jobs_server.url}{JOBS}/run", "POST", body)
        assert status == 422, answer
        status, _, answer = call(f"{jobs_server.url}{JOBS}/run-durable", "POST", body)
        assert status == 422, answer
        status, _, answer = call(f"{jobs_server.url}/v1/images/generations", "POST", {"prompt": "x", "model": model})
        assert status == 400, answer
        assert (await mcp_call(jobs_server, {**BODY, "model": model})).isError
    assert fresh_upstream.requests == []

    status, _, image = call(f"{jobs_server.url}{JOBS}/run", "POST", {**BODY, "model": DEFAULT_MODEL})
    assert status == 200
    assert f'Iptc4xmpExt:AISystemUsed="{DEFAULT_MODEL}"'.encode() in image  # the mark names the served model
    status, _, listed = call(f"{jobs_server.url}/v1/models")
    assert [m["id"] for m in json.loads(listed)["data"]] == [DEFAULT_MODEL]
