"""Per-key quotas through real servers: limit headers on every answer, 429 past the limit, one quota over Redis."""

import json
import urllib.error
import urllib.request

import pytest
from conftest import post, post_raw, server_env, start_server, stop_server
from redis import Redis
from redis_server import RedisServer
from scrape import METRICS_KEY, scraped, value

from image_generation_server.quota import MemoryCounts, Quota, RateLimit

LIMIT = 3  # per day: a window boundary during a test is as unlikely as it gets
BODY = {"prompt": "a quota", "width": 64, "height": 64}
LIMIT_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")


@pytest.fixture
def start(upstream, tmp_path):
    """Start servers with a quota of LIMIT a day (and extra settings); all are stopped at the end."""
    started = []

    def start_one(**env: str):
        env = {"IMAGE_GENERATION_RATE_LIMIT": f"{LIMIT}/day", "IMAGE_GENERATION_ENDPOINT": upstream.url, **env}
        started.append(start_server(tmp_path, server_env(**env)))
        return started[-1]

    yield start_one
    for server in started:
        stop_server(server)


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def remaining(headers: dict[str, str]) -> int:
    assert headers["x-ratelimit-limit-requests"] == str(LIMIT)
    assert 0 < int(headers["x-ratelimit-reset-requests"].removesuffix("s")) <= 86400
    return int(headers["x-ratelimit-remaining-requests"])


def test_every_answer_carries_the_limit_and_the_request_past_it_is_a_429(start, fresh_upstream):
    server = start()
    answers = [
        post(server, BODY),  # 200
        post(server, {**BODY, "colour": "blue"}),  # 422 from the guard
        post(server, {**BODY, "width": 100}),  # 422 from the route
    ]
    assert [status for status, _, _ in answers] == [200, 422, 422]
    assert [remaining(headers) for _, headers, _ in answers] == [2, 1, 0]

    status, headers, body = post(server, BODY)
    assert status == 429
    assert remaining(headers) == 0
    assert 0 < int(headers["retry-after"]) <= 86400
    assert "detail" in json.loads(body)
    assert len(fresh_upstream.requests) == 1  # the refused request cost nothing upstream
    with urllib.request.urlopen(f"{server.url}/status", timeout=30) as response:  # other routes are not counted
        assert not any(name in {k.lower() for k in response.headers} for name in LIMIT_HEADERS)


def test_each_api_key_has_its_own_quota(start, fresh_upstream):
    server = start(IMAGE_GENERATION_API_KEYS="key-one-for-tests,key-two-for-tests")

    def as_key(key: str | None) -> tuple[int, dict[str, str]]:
        status, headers, _ = post_raw(server, json.dumps(BODY).encode(), {"Authorization": f"Bearer {key}"})
        return status, headers

    for expected in (2, 1, 0):
        status, headers = as_key("key-one-for-tests")
        assert (status, remaining(headers)) == (200, expected)
    assert as_key("key-one-for-tests")[0] == 429
    status, headers = as_key("wrong-key")
    assert status == 401  # no key, no quota to take from: nobody's is spent
    status, headers = as_key("key-two-for-tests")
    assert (status, remaining(headers)) == (200, LIMIT - 1)


def test_replicas_share_one_quota_in_redis_and_let_requests_through_when_it_is_down(start, redis, fresh_upstream):
    env = {"HAYHOOKS_DURABLE_REDIS_URL": redis.url, "IMAGE_GENERATION_METRICS_KEY": METRICS_KEY}
    a, b = start(**env), start(**env)
    assert remaining(post(a, BODY)[1]) == 2
    assert remaining(post(b, BODY)[1]) == 1
    assert remaining(post(a, BODY)[1]) == 0
    assert post(b, BODY)[0] == 429
    # Each count expires with its window: a key without a TTL (-1) would stay in Redis forever.
    store = Redis.from_url(redis.url)
    [key] = store.keys("image-generation:quota:*")
    assert 0 < store.ttl(key) <= 86400 + 1
    store.close()

    redis.stop()
    status, headers, _ = post(b, BODY)
    assert status == 200  # fail open
    assert headers["x-ratelimit-limit-requests"] == str(LIMIT)
    assert "x-ratelimit-remaining-requests" not in headers
    assert "Quota store unreachable" in b.log()
    assert value(scraped(b), "image_generation_quota_store_errors_total") == 1


def forwarded_for(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


def test_a_forged_x_forwarded_for_changes_nothing_by_default(start, fresh_upstream):
    """Issue 22: each new header value was a fresh quota, and the access log recorded the forged address."""
    server = start()
    answers = [post_raw(server, json.dumps(BODY).encode(), forwarded_for(f"203.0.113.{i}")) for i in range(LIMIT + 1)]
    assert [status for status, _, _ in answers] == [200] * LIMIT + [429]  # one client, one quota
    assert "203.0.113." not in server.log()
    assert "127.0.0.1:" in server.log()  # the access log names the connection's address


def test_a_trusted_proxy_forwards_addresses_and_junk_is_bounded(start, redis, fresh_upstream):
    """With the proxy listed, each forwarded address has its own quota; a value that is no address names no key."""
    server = start(IMAGE_GENERATION_TRUSTED_PROXIES="127.0.0.1", HAYHOOKS_DURABLE_REDIS_URL=redis.url)
    for i in range(LIMIT + 1):
        status, headers, _ = post_raw(server, json.dumps(BODY).encode(), forwarded_for(f"203.0.113.{i}"))
        assert (status, remaining(headers)) == (200, LIMIT - 1)
    assert "203.0.113.3" in server.log()
    junk = [post_raw(server, json.dumps(BODY).encode(), forwarded_for(f"{i}" * 12000)) for i in range(LIMIT + 1)]
    assert [status for status, _, _ in junk] == [200] * LIMIT + [429]  # all of them are one `unknown` client
    # IPv6 clients count by their /64.
    v6 = [post_raw(server, json.dumps(BODY).encode(), forwarded_for(f"2001:db8::{i}")) for i in range(LIMIT + 1)]
    assert [status for status, _, _ in v6] == [200] * LIMIT + [429]
    keys = redis_keys(redis)
    assert keys and max(len(key) for key in keys) < 120


def redis_keys(server: RedisServer) -> list[bytes]:
    client = Redis.from_url(server.url)
    try:
        return client.keys("*")
    finally:
        client.close()


def test_trusted_proxies_must_be_addresses(upstream, tmp_path):
    env = server_env(IMAGE_GENERATION_ENDPOINT=upstream.url, IMAGE_GENERATION_TRUSTED_PROXIES="proxy.example")
    with pytest.raises(RuntimeError, match=r"IMAGE_GENERATION_TRUSTED_PROXIES='proxy\.example'"):
        start_server(tmp_path, env)


async def test_the_in_process_counts_forget_the_least_recently_seen_past_their_bound():
    """The table holds at most `max_identities`: a spent identity pushed out by newer ones starts again."""
    quota = Quota(RateLimit(1, 86400), MemoryCounts(max_identities=2))
    assert (await quota.take("address:a"))[1] is None
    assert (await quota.take("address:a"))[1] is not None  # spent
    for other in ("address:b", "address:c"):
        assert (await quota.take(other))[1] is None
    assert (await quota.take("address:a"))[1] is None  # forgotten: the table did not grow past two


def test_a_quota_can_count_images(start, fresh_upstream):
    """Issue 22: quotas counted requests only; with `images`, a request for `n: 10` takes ten."""
    server = start(IMAGE_GENERATION_RATE_LIMIT="12/day", IMAGE_GENERATION_RATE_LIMIT_UNIT="images")

    def images(n: int, route: str = "/v1/images/generations") -> tuple[int, dict[str, str]]:
        body = {"prompt": "counted", "size": "64x64", "n": n} if route.startswith("/v1") else BODY
        request = urllib.request.Request(
            f"{server.url}{route}", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}

    status, headers = images(10)
    assert (status, headers["x-ratelimit-limit-images"], headers["x-ratelimit-remaining-images"]) == (200, "12", "2")
    status, headers = images(3)
    assert (status, headers["x-ratelimit-remaining-images"]) == (429, "2")  # more than is left: it takes nothing
    assert headers["retry-after"]
    assert images(2)[0] == 200
    status, headers = images(1, "/image_generation/run")  # the native route makes one image
    assert (status, headers["x-ratelimit-remaining-images"]) == (429, "0")
    assert len(fresh_upstream.requests) == 12  # one upstream call per image, none for the refused ones
