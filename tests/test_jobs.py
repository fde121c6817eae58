"""
Jobs on the embedded (in-memory) store: an `image-generation-server` in durable mode, the tiny local model, API keys on.

The stream is read with `curl -N`, as the README does; the image URL is fetched without a key, as an `<img>` would.
"""

import base64
import io
import itertools
import json
import os
import subprocess
import sys
from datetime import datetime

import pytest
from conftest import HAYHOOKS, ROOT, server_env, start_server, stop_server, wait_for
from jobs_client import JOBS, SSE, call, durable_env, job, submit, wait_status
from PIL import Image

from components.image_codec import PNG_SIGNATURE
from image_generation_server.image_store import ImageStore

sys.path.insert(0, str(ROOT / "scripts"))
from tiny_diffusers import build

KEY_A, KEY_B = "job-key-a-0123456789", "job-key-b-0123456789"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
MAX_PENDING = 5  # jobs of all keys together
MAX_PER_KEY = 3  # unfinished jobs of one key
MAX_FINISHED = 4  # finished jobs kept per key


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def jobs_server(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jobs-server")
    env = server_env(
        **durable_env(HAYHOOKS_DURABLE_MAX_NONTERMINAL_EXECUTIONS=str(MAX_PENDING)),
        IMAGE_GENERATION_BACKEND="local",
        IMAGE_GENERATION_LOCAL_MODEL=str(tiny_model),
        IMAGE_GENERATION_CACHE_BYTES="0",
        IMAGE_GENERATION_API_KEYS=f"{KEY_A},{KEY_B}",
        IMAGE_GENERATION_MAX_JOBS_PER_CLIENT=str(MAX_PER_KEY),
        IMAGE_GENERATION_MAX_FINISHED_JOBS_PER_CLIENT=str(MAX_FINISHED),
        IMAGE_GENERATION_IMAGE_DIR=str(tmp / "images"),
    )
    server = start_server(tmp, env, timeout=120)
    server.image_dir = tmp / "images"
    yield server
    stop_server(server)


def body(**overrides):
    return {"prompt": "a job", "width": 64, "height": 64, "num_inference_steps": 4, **overrides}


def test_submit_stream_steps_and_download_the_same_png_as_run(jobs_server):
    base = jobs_server.url
    accepted = submit(base, body(seed=77), A)
    assert accepted["status"] == "queued"

    stream = SSE(f"{base}{accepted['links']['stream']}", A)
    events = list(stream)
    stream.close()
    payloads = [event.data["payload"] for event in events if event.event == "chunk"]
    steps = [p["step"] for p in payloads if p["phase"] == "step"]
    assert steps == [1, 2, 3, 4]
    assert all(p["steps"] == 4 for p in payloads if p["phase"] == "step")
    assert [p["phase"] for p in payloads if p["phase"] != "step"] == ["queued", "generating", "received", "stored"]
    assert events[-1].event == "completed"
    finished = events[-1].data
    assert finished["status"] == "completed"
    assert [p["message"] for p in finished["progress"] if p["kind"] == "step"] == [
        f"step {k} of 4" for k in range(1, 5)
    ]

    (image,) = finished["result"]["images"]
    assert (image["seed"], image["width"], image["height"], image["format"]) == (77, 64, 64, "png")
    status, headers, png = call(f"{base}{image['url']}")  # no API key: the URL is the capability
    assert status == 200
    assert headers["content-type"] == "image/png"
    assert headers["etag"] == image["etag"]
    assert headers["cache-control"].startswith("private") and "immutable" in headers["cache-control"]
    assert len(image["url"].rsplit("/", 1)[1].split(".")[0]) == 32  # 128 random bits, in hex

    status, _, direct = call(f"{base}{JOBS}/run", "POST", body(seed=77), A)
    assert status == 200
    assert png == direct

    assert call(f"{base}{image['url']}", headers={"If-None-Match": image["etag"]})[0] == 304


def test_the_stream_carries_previews_and_resumes_after_the_last_one_seen(jobs_server):
    base = jobs_server.url
    accepted = submit(base, body(seed=78, num_inference_steps=6, partial_images=2), A)
    url = f"{base}{accepted['links']['stream']}"
    stream = SSE(url, A)
    events = list(stream)
    stream.close()
    chunks = [event for event in events if event.event == "chunk"]
    previews = [event for event in chunks if event.data["payload"]["phase"] == "preview"]
    assert [(p.data["payload"]["index"], p.data["payload"]["step"]) for p in previews] == [(0, 2), (1, 4)]
    for preview in previews:
        payload = preview.data["payload"]
        picture = Image.open(io.BytesIO(base64.b64decode(payload["image"])))
        assert (picture.format, picture.size) == ("PNG", (payload["width"], payload["height"]))
        assert payload["mime_type"] == "image/png"
    finished = events[-1].data
    assert "preview" not in {entry["kind"] for entry in finished["progress"]}  # the stream's, not the record's

    # A client that saw the first preview and lost the connection picks up right after it.
    resumed = SSE(url, {**A, "Last-Event-ID": previews[0].id})
    again = list(resumed)
    resumed.close()
    after = [event.id for event in chunks[chunks.index(previews[0]) + 1 :]]
    assert [event.id for event in again if event.event == "chunk"] == after
    assert previews[1].id in after

    # The previews leave the image alone: the same seed without them is the same PNG.
    (image,) = finished["result"]["images"]
    status, _, png = call(f"{base}{image['url']}")
    assert status == 200
    assert png == call(f"{base}{JOBS}/run", "POST", body(seed=78, num_inference_steps=6), A)[2]


def test_n_images_with_consecutive_seeds(jobs_server):
    accepted = submit(jobs_server.url, body(seed=10, n=2, num_inference_steps=1), A)
    done = wait_status(jobs_server.url, accepted["execution_id"], {"completed", "failed"}, headers=A)
    assert [image["seed"] for image in done["result"]["images"]] == [10, 11]
    assert len({image["url"] for image in done["result"]["images"]}) == 2


def test_cancel_stops_the_generation_and_frees_the_device(jobs_server):
    base = jobs_server.url
    accepted = submit(base, body(num_inference_steps=150), A)
    stream = SSE(f"{base}{accepted['links']['stream']}", A)
    seen = 0
    for event in stream:
        if event.event == "chunk" and event.data["payload"]["phase"] == "step":
            seen = event.data["payload"]["step"]
            if seen >= 2:
                break
    status, _, _ = call(f"{base}{accepted['links']['cancel']}", "POST", headers=A)
    assert status in (200, 202)
    finished = wait_status(base, accepted["execution_id"], {"canceled", "completed", "failed"}, headers=A)
    stream.close()
    assert finished["status"] == "canceled"
    assert finished["result"] is None
    steps = [p for p in finished["progress"] if p["kind"] == "step"]
    assert steps[-1]["metadata"]["step"] < 150  # stopped long before the end
    # Stopped at the next step once the worker sees the cancel (it looks at least every 0.5 s): no steps after that.
    step_seconds = max(
        (datetime.fromisoformat(b["timestamp"]) - datetime.fromisoformat(a["timestamp"])).total_seconds()
        for a, b in itertools.pairwise(steps)
    )
    requested = datetime.fromisoformat(finished["cancellation_requested_at"])
    assert (datetime.fromisoformat(steps[-1]["timestamp"]) - requested).total_seconds() <= 0.5 + 2 * step_seconds

    after = submit(base, body(seed=3, num_inference_steps=2), A)  # the device is free for the next job
    assert wait_status(base, after["execution_id"], {"completed", "failed"}, headers=A)["status"] == "completed"


def test_another_key_cannot_see_or_cancel_a_job(jobs_server):
    base = jobs_server.url
    accepted = submit(base, body(num_inference_steps=1), A)
    execution = f"{base}{accepted['links']['self']}"
    assert call(execution, headers=B)[0] == 404
    assert call(f"{execution}/cancel", "POST", headers=B)[0] == 404
    assert call(f"{execution}/stream", headers=B)[0] == 404
    assert call(execution)[0] == 401  # no key at all
    assert call(f"{base}{JOBS}/run-durable", "POST", body())[0] == 401

    mine = json.loads(call(f"{base}{JOBS}/executions", headers=A)[2])["executions"]
    theirs = json.loads(call(f"{base}{JOBS}/executions", headers=B)[2])["executions"]
    assert accepted["execution_id"] in {e["execution_id"] for e in mine}
    assert accepted["execution_id"] not in {e["execution_id"] for e in theirs}
    assert wait_status(base, accepted["execution_id"], {"completed"}, headers=A)


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt": ""},
        {"prompt": "x" * 2001},
        {"prompt": "x\x00y"},
        {"width": 60},
        {"width": 100000},
        {"seed": -1},
        {"model": "https://attacker.example/collect"},
        {"model": "someone/else"},  # not the served model
        {"output_format": "gif"},
        {"n": 0},
        {"n": 11},
        {"sed": 3},
    ],
)
def test_bad_input_is_422_at_submission(jobs_server, bad):
    status, _, data = call(f"{jobs_server.url}{JOBS}/run-durable", "POST", {**body(), **bad}, A)
    assert status == 422, data
    run_status, _, _ = call(f"{jobs_server.url}{JOBS}/run", "POST", {**body(), **bad}, A)
    if "n" not in bad:
        assert run_status == 422  # the same limits as /run


def test_idempotency_key_replays_the_same_job(jobs_server):
    base = jobs_server.url
    key = {**A, "Idempotency-Key": "order-42"}
    first = submit(base, body(seed=5, num_inference_steps=1), key)
    status, headers, data = call(f"{base}{JOBS}/run-durable", "POST", body(seed=5, num_inference_steps=1), key)
    assert status in (200, 202)
    assert headers["idempotent-replay"] == "true"
    assert json.loads(data)["execution_id"] == first["execution_id"]
    assert call(f"{base}{JOBS}/run-durable", "POST", body(seed=6), key)[0] == 409  # same key, other body
    wait_status(base, first["execution_id"], {"completed"}, headers=A)


def cancel_all(base, jobs, headers):
    for pending in jobs:
        call(f"{base}{pending['links']['cancel']}", "POST", headers=headers)
    for pending in jobs:
        assert wait_status(base, pending["execution_id"], {"canceled", "completed"}, headers=headers)


def test_pending_jobs_are_bounded_per_key_and_in_all(jobs_server):
    base = jobs_server.url
    mine = [submit(base, body(num_inference_steps=150), A) for _ in range(MAX_PER_KEY)]
    status, headers, data = call(f"{base}{JOBS}/run-durable", "POST", body(), A)
    assert status == 429  # the key's own limit, named
    assert "IMAGE_GENERATION_MAX_JOBS_PER_CLIENT=3" in json.loads(data)["detail"]
    assert headers["retry-after"]
    theirs = [submit(base, body(num_inference_steps=150), B) for _ in range(MAX_PENDING - MAX_PER_KEY)]
    status, headers, _ = call(f"{base}{JOBS}/run-durable", "POST", body(), B)
    assert status == 503  # all keys together: Hayhooks' limit
    assert headers["retry-after"]
    cancel_all(base, mine, A)
    cancel_all(base, theirs, B)
    again = submit(base, body(num_inference_steps=1), A)  # finished jobs no longer count
    assert wait_status(base, again["execution_id"], {"completed"}, headers=A)


def test_a_second_keys_job_starts_after_at_most_the_first_keys_cap(jobs_server):
    """Issue 22: one key submitted 100 jobs and every other key got 503 for as long as they ran."""
    base = jobs_server.url
    flood = [submit(base, body(num_inference_steps=150), A) for _ in range(MAX_PER_KEY)]
    assert call(f"{base}{JOBS}/run-durable", "POST", body(), A)[0] == 429
    other = submit(base, body(seed=12, num_inference_steps=1), B)  # accepted while A is at its cap
    queued = job(base, other["execution_id"], B)
    assert queued["status"] == "queued"
    assert queued["queue"]["ahead"] <= MAX_PER_KEY  # at most A's jobs start before it
    cancel_all(base, flood, A)
    assert wait_status(base, other["execution_id"], {"completed"}, headers=B)


def test_a_queued_job_says_how_many_are_ahead_and_when_it_starts(jobs_server):
    """One generation slot, three jobs: the third reports two ahead, then fewer as the others end."""
    base = jobs_server.url
    warm = submit(base, body(seed=9, num_inference_steps=2), A)  # a finished job: the estimate has a duration
    assert wait_status(base, warm["execution_id"], {"completed"}, headers=A)
    # The two ahead run long (256², 150 steps) and are cancelled in turn once the third has seen its place: the count
    # goes down as each ends, however fast the machine is.
    first = submit(base, body(seed=1, width=256, height=256, num_inference_steps=150), A)
    second = submit(base, body(seed=2, width=256, height=256, num_inference_steps=150), A)
    third = submit(base, body(seed=3, num_inference_steps=1), A)
    status = job(base, third["execution_id"], A)
    assert status["status"] == "queued"
    assert status["queue"]["ahead"] == 2
    assert isinstance(status["queue"]["estimated_start_seconds"], int)

    stream = SSE(f"{base}{third['links']['stream']}", A)
    places = []
    running = {2: first, 1: second}  # the job that runs while the third has this many ahead
    for event in stream:
        if event.event == "queue":
            places.append(event.data)
            if ahead := running.pop(event.data["ahead"], None):
                call(f"{base}{ahead['links']['cancel']}", "POST", headers=A)
        elif event.event == "chunk" and event.data["payload"]["phase"] != "queued":
            break
    stream.close()
    aheads = [place["ahead"] for place in places]
    assert aheads[:2] == [2, 1], places  # two ahead, then one as the first ends
    assert aheads == sorted(set(aheads), reverse=True)  # only ever fewer
    assert all(isinstance(place["estimated_start_seconds"], int) for place in places), places
    assert "queue" not in wait_status(base, third["execution_id"], {"completed"}, headers=A)
    assert wait_status(base, first["execution_id"], {"canceled"}, headers=A)
    assert wait_status(base, second["execution_id"], {"canceled"}, headers=A)


def test_finished_jobs_are_kept_per_key_up_to_a_count(jobs_server):
    """Issue 22: finished jobs were kept 7 days with no cap (one key made 12,000 in 50 s)."""
    base = jobs_server.url
    finished = []
    for seed in range(MAX_FINISHED + 2):
        accepted = submit(base, body(seed=seed, num_inference_steps=1), B)
        assert wait_status(base, accepted["execution_id"], {"completed"}, headers=B)
        finished.append(accepted["execution_id"])
    submit(base, body(seed=99, num_inference_steps=1), B)  # a submission prunes the key's oldest finished jobs
    kept = [call(f"{base}{JOBS}/executions/{execution_id}", headers=B)[0] for execution_id in finished]
    assert kept[-MAX_FINISHED:] == [200] * MAX_FINISHED
    assert kept[0] == 404
    listed = json.loads(call(f"{base}{JOBS}/executions", headers=B)[2])["executions"]
    assert finished[0] not in {e["execution_id"] for e in listed}
    assert len([e for e in listed if e["status"] != "queued" and e["status"] != "running"]) <= MAX_FINISHED


def test_status_says_only_that_the_server_is_alive(jobs_server):
    """Issue 22: anonymous `/status` showed the job store's counts (every key's jobs); an API key is no operator."""
    accepted = submit(jobs_server.url, body(num_inference_steps=1), A)
    for headers in (None, A):
        status, _, data = call(f"{jobs_server.url}/status", headers=headers)
        assert status == 200
        served = ["image_editing", "image_editing_json", "image_generation", "image_generation_json"]
        assert json.loads(data) == {"status": "Up!", "pipelines": served}
    assert wait_status(jobs_server.url, accepted["execution_id"], {"completed"}, headers=A)


def test_evicted_image_is_404(jobs_server):
    base = jobs_server.url
    accepted = submit(base, body(seed=8, num_inference_steps=1), A)
    url = wait_status(base, accepted["execution_id"], {"completed"}, headers=A)["result"]["images"][0]["url"]
    assert call(f"{base}{url}")[0] == 200
    ImageStore(jobs_server.image_dir, max_bytes=1, max_age_seconds=3600).sweep()  # what the server's sweeper runs
    status, _, data = call(f"{base}{url}")
    assert status == 404
    assert json.loads(data) == {"detail": "no such image (it may have expired)"}


def test_store_sweeper_deletes_images_past_their_age(tmp_path):
    store = ImageStore(tmp_path, max_bytes=10_000, max_age_seconds=3600)
    stored = [store.put(bytes([i]) * 1000, "png") for i in range(2)]
    path = tmp_path / f"{stored[0].id}.png"
    os.utime(path, (path.stat().st_mtime - 7200,) * 2)  # past the age limit
    assert store.sweep() == 1
    assert store.read(f"{stored[0].id}.png") is None
    assert store.read(f"{stored[1].id}.png") == bytes([1]) * 1000
    assert store.read("../../etc/passwd") is None


def test_memory_store_refuses_several_workers(tmp_path):
    env = server_env(**durable_env(), HAYHOOKS_PIPELINES_DIR=str(ROOT / "served"))
    log = tmp_path / "uvicorn.log"
    argv = [
        str(HAYHOOKS.with_name("uvicorn")),
        "--factory",
        "image_generation_server.app:create_app",
        "--workers",
        "2",
        "--port",
        "0",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:  # uvicorn's supervisor restarts the workers that refuse; each says why
        assert wait_for(lambda: "the in-memory job store serves one process" in log.read_text(), timeout=120)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_plain_hayhooks_run_serves_the_same_folder_without_jobs(upstream, tmp_path):
    """
    Live mode (no durable setting): the same folder loads, `/run` answers, and there are no job routes.

    (`deploy-yaml` onto this setup is tested in test_service.py, under a name of its own: deploying over a pipeline
    that was loaded from the folder makes Hayhooks delete its file.)
    """
    env = server_env(IMAGE_GENERATION_ENDPOINT=upstream.url, HAYHOOKS_STARTUP_DEPLOY_STRATEGY="sequential")
    server = start_server(tmp_path, env, command=[str(HAYHOOKS), "run"])
    try:
        assert call(f"{server.url}{JOBS}/run-durable", "POST", body())[0] == 404
        status, _, data = call(f"{server.url}{JOBS}/run", "POST", {"prompt": "x", "width": 64, "height": 64})
        assert status == 200, data
        assert data.startswith(PNG_SIGNATURE)
    finally:
        stop_server(server)
