"""Test helpers for jobs: a JSON client for the job routes, an SSE reader (curl -N), durable-mode settings."""

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from conftest import wait_for

JOBS = "/image_generation"


def call(
    url: str, method: str = "GET", body: dict | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request; returns status, headers (lower-case names) and body, errors included."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def submit(base: str, body: dict, headers: dict[str, str] | None = None) -> dict:
    """Submit a job; it must be accepted (202 with its Location)."""
    status, response_headers, data = call(f"{base}{JOBS}/run-durable", "POST", body, headers)
    assert status == 202, (status, data)
    job = json.loads(data)
    assert response_headers["location"] == job["links"]["self"]
    return job


def job(base: str, execution_id: str, headers: dict[str, str] | None = None, jobs: str = JOBS) -> dict:
    """The job as `GET executions/{id}` answers it (`jobs`: the pipeline's path, `/image_editing` for edit jobs)."""
    status, _, data = call(f"{base}{jobs}/executions/{execution_id}", headers=headers)
    assert status == 200, (status, data)
    return json.loads(data)


def wait_status(
    base: str,
    execution_id: str,
    statuses: set[str],
    timeout: float = 90,
    headers: dict[str, str] | None = None,
    jobs: str = JOBS,
) -> dict:
    """Poll the job until its status is one of `statuses`."""
    found: dict = {}

    def reached() -> bool:
        nonlocal found
        found = job(base, execution_id, headers, jobs)
        return found["status"] in statuses

    assert wait_for(reached, timeout), found
    return found


@dataclass
class Event:
    """One server-sent event."""

    id: str | None
    event: str
    data: dict


class SSE:
    """`curl -N` reading a job's event stream, parsed into events as they arrive."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        argv = ["curl", "-sN", "--max-time", "180", url]
        for name, value in (headers or {}).items():
            argv += ["-H", f"{name}: {value}"]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)

    def __iter__(self) -> Iterator[Event]:
        """Events until the stream ends (a terminal event, or the connection closing)."""
        assert self.process.stdout is not None
        fields: dict[str, str] = {}
        for raw in self.process.stdout:
            line = raw.rstrip("\n")
            if line:
                name, _, value = line.partition(":")
                if name:  # a line starting with ':' is a comment (heartbeat)
                    fields[name] = value.removeprefix(" ")
                continue
            if "data" in fields:
                yield Event(fields.get("id"), fields.get("event", "message"), json.loads(fields["data"]))
            fields = {}

    def close(self) -> None:
        """Stop curl."""
        self.process.kill()
        self.process.wait()


def durable_env(**overrides: str) -> dict[str, str]:
    """Durable mode with short polls and leases, so that tests see recoveries in seconds, not minutes."""
    return {
        "HAYHOOKS_DURABLE_MODE": "true",
        "HAYHOOKS_DURABLE_POLL_INTERVAL_SECONDS": "0.2",
        "HAYHOOKS_DURABLE_MAINTENANCE_INTERVAL_SECONDS": "0.5",
        "HAYHOOKS_DURABLE_LEASE_DURATION_MS": "3000",
        "HAYHOOKS_DURABLE_LEASE_COMMIT_SAFETY_MS": "500",
        **overrides,
    }
