"""
Jobs shared by replicas on a real redis-server: two `image-generation-server` processes, one Redis, one image volume.

The replicas use the API backend against the fake upstream (its latency makes jobs as long as a test needs) and short
leases and polls, so that a crashed replica's job is recovered in seconds.
"""

import http.client
import json
import os
import signal

import pytest
from conftest import server_env, start_server, stop_server, wait_for
from fake_upstream import Fault
from jobs_client import JOBS, SSE, call, durable_env, submit, wait_status
from redis import Redis
from redis_server import RedisServer

OPERATOR_TOKEN = "operator-token-for-tests-0123456789abcdef"


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def replicas(redis, upstream, tmp_path):
    """Start replicas on demand (they share Redis and the image directory); all are stopped at the end."""
    started = []

    def start(count: int = 1, **settings: str):
        env = server_env(
            HAYHOOKS_LOG_LEVEL="DEBUG",  # "Generated ..." tells which replica did the work
            **settings,
            **durable_env(HAYHOOKS_DURABLE_STORE="redis", HAYHOOKS_DURABLE_REDIS_URL=redis.url),
            IMAGE_GENERATION_ENDPOINT=upstream.url,
            IMAGE_GENERATION_IMAGE_DIR=str(tmp_path / "images"),
            HAYHOOKS_TRACING_TOKEN=OPERATOR_TOKEN,
        )
        new = [start_server(tmp_path, env) for _ in range(count)]
        started.extend(new)
        return new

    yield start
    for server in started:
        if server.process.poll() is None:
            stop_server(server)


def body(**overrides):
    return {"prompt": "a shared job", "width": 64, "height": 64, **overrides}


def test_two_replicas_drain_one_queue(replicas, fresh_upstream):
    a, b = replicas(2)
    fresh_upstream.latency = 1.0
    jobs = [submit(a.url, body(seed=i)) for i in range(6)]
    for job in jobs:
        done = wait_status(a.url, job["execution_id"], {"completed", "failed"})
        assert done["status"] == "completed", done
    assert a.log().count("Generated 64x64 png") >= 1
    assert b.log().count("Generated 64x64 png") >= 1  # b took work that was submitted to a

    url = done["result"]["images"][0]["url"]
    assert call(f"{b.url}{url}")[0] == 200  # any replica serves any image (one shared directory)
    assert call(f"{b.url}{jobs[0]['links']['self']}")[0] == 200  # and any job

    # The seeded-result cache is shared through Redis: a repeat on the other replica costs no upstream call.
    fresh_upstream.requests.clear()
    seeded = body(prompt="shared cache", seed=4242)
    status, _, made = call(f"{a.url}{JOBS}/run", "POST", seeded)
    assert status == 200
    status, _, repeat = call(f"{b.url}{JOBS}/run", "POST", seeded)
    assert status == 200
    assert repeat == made
    assert len(fresh_upstream.requests) == 1

    # Keys off: ids are capabilities, and the list of every job is for the operator only.
    assert call(f"{a.url}{JOBS}/executions")[0] in (401, 403)
    status, _, data = call(f"{a.url}{JOBS}/executions", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    assert status == 200
    assert {job["execution_id"] for job in jobs} <= {e["execution_id"] for e in json.loads(data)["executions"]}
    # The operator also gets Hayhooks' whole /status (the store's counts); others only that the server is up.
    status, _, data = call(f"{a.url}/status", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    assert status == 200
    assert json.loads(data)["durable"]["deployments"]["image_generation"]["counts"]["nonterminal"] == 0
    assert set(json.loads(call(f"{a.url}/status")[2])) == {"status", "pipelines"}


def test_kill_9_of_the_running_replica_hands_the_job_to_the_other(replicas, fresh_upstream):
    a, b = replicas(2)
    fresh_upstream.latency = 30.0  # the first attempt never finishes: its replica dies first
    job = submit(a.url, body(seed=9))  # the submitting replica, idle, claims it at once
    assert wait_for(lambda: len(fresh_upstream.requests) == 1, timeout=30)
    stream = SSE(f"{a.url}{job['links']['stream']}")
    last_id = None
    for event in stream:
        last_id = event.id
        if event.data["payload"]["phase"] == "sent":
            break
    fresh_upstream.latency = 0.2
    os.kill(a.process.pid, signal.SIGKILL)
    a.process.wait()
    stream.close()

    resumed = SSE(f"{b.url}{job['links']['stream']}", {"Last-Event-ID": last_id})
    events = list(resumed)
    resumed.close()
    assert events[-1].event == "completed", events
    finished = events[-1].data
    assert finished["status"] == "completed"
    assert finished["attempt"] == 2
    assert all(event.id != last_id for event in events)  # resumed after the last event seen, not from the start
    assert {e.data["attempt"] for e in events if e.event == "chunk"} == {2}
    assert call(f"{b.url}{finished['result']['images'][0]['url']}")[0] == 200


def test_redis_outage_is_503_then_recovers_without_restart(replicas, redis, fresh_upstream):
    (a,) = replicas(1)
    fresh_upstream.latency = 2.0
    job = submit(a.url, body(seed=21))
    assert wait_for(lambda: len(fresh_upstream.requests) == 1, timeout=30)
    redis.stop()

    status, headers, data = call(f"{a.url}{job['links']['self']}")
    assert status == 503, data
    assert json.loads(data) == {"detail": "Durable execution store is unavailable"}
    assert headers["retry-after"] == "5"
    status, _, data = call(f"{a.url}{JOBS}/run-durable", "POST", body())
    assert status == 503, data
    assert call(f"{a.url}{JOBS}/run", "POST", body(seed=23))[0] == 200  # images without jobs still work

    redis.start()
    done = wait_status(a.url, job["execution_id"], {"completed", "failed"}, timeout=120)
    assert done["status"] == "completed", done
    again = submit(a.url, body(seed=22))
    assert wait_status(a.url, again["execution_id"], {"completed", "failed"})["status"] == "completed"


def test_cancel_drops_the_upstream_call(replicas, fresh_upstream):
    (a,) = replicas(1)
    fresh_upstream.latency = 60.0
    job = submit(a.url, body(seed=31))
    assert wait_for(lambda: len(fresh_upstream.requests) == 1, timeout=30)
    assert call(f"{a.url}{job['links']['cancel']}", "POST")[0] in (200, 202)
    assert wait_status(a.url, job["execution_id"], {"canceled", "completed", "failed"}, timeout=30)["status"] == (
        "canceled"
    )
    assert wait_for(lambda: fresh_upstream.abandoned == 1, timeout=10)  # the upstream saw its caller hang up


def test_a_failed_upstream_fails_the_job_with_its_cause(replicas, fresh_upstream):
    (a,) = replicas(1)
    fresh_upstream.fail_next(Fault(status=502))
    job = submit(a.url, body(seed=41))
    failed = wait_status(a.url, job["execution_id"], {"completed", "failed"})
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "UpstreamError"
    assert failed["result"] is None


def test_the_sweeper_deletes_images_past_their_age(replicas, fresh_upstream):
    (a,) = replicas(1, IMAGE_GENERATION_IMAGE_MAX_AGE="4")  # swept every second
    job = submit(a.url, body(seed=51))
    url = wait_status(a.url, job["execution_id"], {"completed"})["result"]["images"][0]["url"]
    assert call(f"{a.url}{url}")[0] == 200
    assert wait_for(lambda: call(f"{a.url}{url}")[0] == 404, timeout=20)


def test_one_keys_jobs_are_never_answered_from_another_keys_images(replicas, fresh_upstream):
    """With API keys on, the seeded cache (in process and in Redis) is scoped to the job's owner, as for `/run`."""
    keys = ("scope-key-a-0123456789", "scope-key-b-0123456789")
    [server] = replicas(IMAGE_GENERATION_API_KEYS=",".join(keys))
    a, b = ({"Authorization": f"Bearer {key}"} for key in keys)

    def run_job(headers: dict[str, str]) -> None:
        submitted = submit(server.url, body(seed=77), headers)
        assert wait_status(server.url, submitted["execution_id"], {"completed"}, headers=headers)

    run_job(a)
    run_job(a)  # the same key: a seeded repeat comes from the cache
    assert len(fresh_upstream.requests) == 1
    run_job(b)  # another key pays for its own image
    assert len(fresh_upstream.requests) == 2


def test_a_second_keys_stream_works_while_the_first_holds_its_maximum(replicas, fresh_upstream):
    """Issue 22: one key's open progress streams used up the shared Redis pool; another key's stream failed at once."""
    keys = ("stream-key-a-0123456789", "stream-key-b-0123456789")
    [server] = replicas(
        IMAGE_GENERATION_API_KEYS=",".join(keys),
        IMAGE_GENERATION_MAX_STREAMS_PER_CLIENT="2",
        HAYHOOKS_DURABLE_REDIS_MAX_VIEWERS="3",  # the pool of streams of the replica, for every client
    )
    a, b = ({"Authorization": f"Bearer {key}"} for key in keys)
    fresh_upstream.latency = 30.0
    mine = submit(server.url, body(seed=61), a)
    held = [SSE(f"{server.url}{mine['links']['stream']}", a) for _ in range(2)]
    try:
        for stream in held:
            assert next(iter(stream)).event in ("chunk", "queue")  # open and streaming
        status, headers, data = call(f"{server.url}{mine['links']['stream']}", headers=a)
        assert status == 429
        assert "IMAGE_GENERATION_MAX_STREAMS_PER_CLIENT=2" in json.loads(data)["detail"]
        assert headers["retry-after"]

        theirs = submit(server.url, body(seed=62), b)
        other = SSE(f"{server.url}{theirs['links']['stream']}", b)
        first = next(iter(other))
        other.close()
        assert first.event in ("chunk", "queue"), first  # not Hayhooks' "error" of a stream without a connection
    finally:
        for stream in held:
            stream.close()
    for job_, headers_ in ((mine, a), (theirs, b)):
        call(f"{server.url}{job_['links']['cancel']}", "POST", headers=headers_)


def post_from(address: str, url: str, payload: dict, headers: dict[str, str]) -> tuple[int, dict[str, str], dict]:
    """POST JSON from the local address `address` (127.0.0.x: another client of a server on 127.0.0.1)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30, source_address=(address, 0))
    try:
        connection.request(
            "POST", f"{JOBS}/run-durable", json.dumps(payload), {"Content-Type": "application/json", **headers}
        )
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read())
    finally:
        connection.close()


def test_an_idempotency_key_is_each_clients_own(replicas, fresh_upstream):
    """Issue 22: with keys off, an Idempotency-Key was shared by all clients (one could replay or block another's)."""
    (server,) = replicas(1)
    key = {"Idempotency-Key": "order-1"}
    status, _, first = post_from("127.0.0.1", server.url, body(seed=71), key)
    assert status == 202
    status, headers, again = post_from("127.0.0.1", server.url, body(seed=71), key)
    assert (status in (200, 202), headers.get("idempotent-replay")) == (True, "true")
    assert again["execution_id"] == first["execution_id"]  # the same client replays its own

    status, headers, other = post_from("127.0.0.2", server.url, body(seed=72), key)  # another body: not blocked
    assert status == 202, other
    assert "idempotent-replay" not in headers
    status, _, _ = post_from("127.0.0.2", server.url, body(seed=71), key)
    assert status == 409  # its own key is bound to its own job: never a replay of the first client's
    for done in (first, other):
        assert wait_status(server.url, done["execution_id"], {"completed"})["status"] == "completed"


def test_finished_jobs_beyond_a_clients_share_are_deleted_from_redis(replicas, redis, fresh_upstream):
    (server,) = replicas(1, IMAGE_GENERATION_MAX_FINISHED_JOBS_PER_CLIENT="1")
    done = []
    for seed in (81, 82):
        accepted = submit(server.url, body(seed=seed))
        assert wait_status(server.url, accepted["execution_id"], {"completed"})["status"] == "completed"
        done.append(accepted["execution_id"])
    submit(server.url, body(seed=83))  # the submission that prunes: one finished job is kept, the newest
    assert call(f"{server.url}{JOBS}/executions/{done[0]}")[0] == 404
    assert call(f"{server.url}{JOBS}/executions/{done[1]}")[0] == 200
    client = Redis.from_url(redis.url)
    try:
        assert client.keys(f"*{done[0]}*") == []  # nothing of it is left in Redis
    finally:
        client.close()
