"""`GET /metrics` through a real server: a scripted mix of requests, read back with prometheus_client's own parser."""

import json
import threading
import urllib.request

import pytest
from conftest import HAYHOOKS, ROOT, free_port, launch, post, server_env, start_server, stop_server, wait_for
from fake_upstream import Fault
from jobs_client import JOBS, durable_env, submit, wait_status
from scrape import METRICS_KEY, samples, scrape, value

RUN = "/image_generation/run"
DEFAULT_MODEL = "black-forest-labs/FLUX.1-schnell"
PROMPT = "a lighthouse that must never show up in the metrics"


@pytest.fixture
def metrics_server(fresh_upstream, tmp_path):
    srv = start_server(tmp_path, server_env(IMAGE_GENERATION_ENDPOINT=fresh_upstream.url, **{
        "IMAGE_GENERATION_METRICS_KEY": METRICS_KEY,
    }))  # fmt: skip
    yield srv
    stop_server(srv)


def post_to(server, path: str, body: dict) -> int:
    request = urllib.request.Request(
        f"{server.url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status


def test_metrics_count_a_scripted_mix_exactly(metrics_server, fresh_upstream):
    body = {"prompt": PROMPT, "width": 512, "height": 512}
    # 7 successes: 4 plain, 2 with the same pinned seed (a miss, then a hit), 1 JPEG at 1024x768; then 2 identical
    # pinned requests at once, one of which joins the other's upstream call. A model the endpoint does not serve is
    # refused before the pipeline.
    for _ in range(4):
        assert post(metrics_server, body)[0] == 200
    assert post(metrics_server, {**body, "model": "someone/unlisted-model"})[0] == 422
    for _ in range(2):
        assert post(metrics_server, {**body, "seed": 7})[0] == 200
    assert post(metrics_server, {**body, "width": 1024, "height": 768, "output_format": "jpeg"})[0] == 200
    fresh_upstream.latency = 2.0
    statuses: list[int] = []

    def pinned_post() -> None:
        statuses.append(post(metrics_server, {**body, "seed": 8})[0])

    pair = [threading.Thread(target=pinned_post) for _ in range(2)]
    pair[0].start()
    assert wait_for(lambda: len(fresh_upstream.requests) == 7, timeout=30)
    pair[1].start()  # while the first one's upstream call is still running
    for thread in pair:
        thread.join(60)
    assert statuses == [200, 200]
    fresh_upstream.latency = 0.0
    # 2 more images through the OpenAI door, in one request.
    assert post_to(metrics_server, "/v1/images/generations", {"prompt": PROMPT, "size": "512x512", "n": 2}) == 200
    # 2 more refusals before the pipeline (a size out of range, an unknown field) and 1 upstream 429.
    assert post(metrics_server, {**body, "width": 100})[0] == 422
    assert post(metrics_server, {**body, "colour": "blue"})[0] == 422
    fresh_upstream.fail_next(Fault(status=429, headers={"Retry-After": "3"}))
    assert post(metrics_server, body)[0] == 429
    assert scrape(metrics_server, key="wrong-key")[0] == 401

    status, text = scrape(metrics_server)
    assert status == 200
    parsed = samples(text)
    requests = "image_generation_http_requests_total"
    assert value(parsed, requests, route=RUN, door="native", status="200") == 9
    assert value(parsed, requests, route=RUN, door="native", status="422") == 3
    assert value(parsed, requests, route=RUN, door="native", status="429") == 1
    assert value(parsed, requests, route="/metrics", door="other", status="401") == 1
    assert value(parsed, "image_generation_http_request_duration_seconds_count", door="native") == 13
    assert value(parsed, requests, route="/v1/images/generations", door="openai", status="200") == 1

    upstream_calls = len(fresh_upstream.requests)  # 3 + 1 + 1 + 1 + 1 (the pair) + 2 (OpenAI) + 1 (the 429)
    assert upstream_calls == 10
    assert value(parsed, "image_generation_upstream_requests_total", status="200") == 9
    assert value(parsed, "image_generation_upstream_requests_total", status="429") == 1
    assert value(parsed, "image_generation_upstream_request_duration_seconds_count", status="429") == 1
    assert value(parsed, "image_generation_queue_wait_seconds_count") == upstream_calls
    assert value(parsed, "image_generation_generation_seconds_count") == 9
    assert value(parsed, "image_generation_postprocess_seconds_count") == 9
    assert value(parsed, "image_generation_in_flight") == 0
    assert value(parsed, "image_generation_queue_depth") == 0

    assert value(parsed, "image_generation_cache_lookups_total", result="miss") == 3  # seed 7 once, seed 8 twice
    assert value(parsed, "image_generation_cache_lookups_total", result="hit") == 1
    assert value(parsed, "image_generation_cache_bytes") > 0
    assert value(parsed, "image_generation_coalesced_requests_total") == 1

    images = "image_generation_images_total"
    assert value(parsed, images, model=DEFAULT_MODEL, size="512x512", format="png") == 8
    assert value(parsed, images, model=DEFAULT_MODEL, size="1024x1024", format="jpeg") == 1
    assert sum(v for (name, _), v in parsed.items() if name == images) == 9
    # Nothing a client sent is a label: no prompt, no unserved model id.
    assert "lighthouse" not in text
    assert "unlisted" not in text


def test_metrics_are_off_without_their_key(server):
    assert scrape(server)[0] == 404


def test_several_workers_add_up_in_multiprocess_mode(upstream, fresh_upstream, tmp_path):
    """`uvicorn --workers 2` as the README runs it: every scrape, whichever worker answers it, counts every request."""
    (tmp_path / "prometheus").mkdir()
    env = server_env(
        IMAGE_GENERATION_ENDPOINT=upstream.url,
        IMAGE_GENERATION_METRICS_KEY=METRICS_KEY,
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prometheus"),
        HAYHOOKS_PIPELINES_DIR=str(ROOT / "served"),
    )
    port = free_port()
    argv = [str(HAYHOOKS.with_name("uvicorn")), "--factory", "image_generation_server.app:create_app", "--workers", "2",
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    server = launch(argv, ROOT, env, tmp_path / "uvicorn.log", port, timeout=120)
    try:
        for _ in range(8):
            assert post(server, {"prompt": "counted once", "width": 64, "height": 64})[0] == 200
        for _ in range(4):
            parsed = samples(scrape(server)[1])
            assert value(parsed, "image_generation_http_requests_total", route=RUN, door="native", status="200") == 8
            assert (
                value(parsed, "image_generation_images_total", model=DEFAULT_MODEL, size="256x256", format="png") == 8
            )
    finally:
        stop_server(server)


def test_jobs_are_counted_as_the_job_door(fresh_upstream, tmp_path):
    """Durable mode: the job routes are the `job` door, and the image a job makes is counted like any other."""
    env = server_env(
        **durable_env(), IMAGE_GENERATION_ENDPOINT=fresh_upstream.url, IMAGE_GENERATION_METRICS_KEY=METRICS_KEY
    )
    server = start_server(tmp_path, env)
    try:
        job = submit(server.url, {"prompt": PROMPT, "width": 64, "height": 64})
        assert wait_status(server.url, job["execution_id"], {"completed", "failed"})["status"] == "completed"
        parsed = samples(scrape(server)[1])
    finally:
        stop_server(server)
    requests = "image_generation_http_requests_total"
    assert value(parsed, requests, route=f"{JOBS}/run-durable", door="job", status="202") == 1
    assert value(parsed, requests, route=f"{JOBS}/executions/{{execution_id}}", door="job", status="200") >= 1
    assert value(parsed, "image_generation_images_total", model=DEFAULT_MODEL, size="256x256", format="png") == 1
    assert value(parsed, "image_generation_upstream_requests_total", status="200") == 1
