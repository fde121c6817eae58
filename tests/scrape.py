"""Reading `GET /metrics` the way Prometheus does: the scrape key as a Bearer token, prometheus_client's parser."""

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

METRICS_KEY = "scrape-key-for-tests"


def scrape(server, key: str | None = METRICS_KEY) -> tuple[int, str]:
    """GET /metrics; returns status and text."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(f"{server.url}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of the exposition, by name and label set, as the Prometheus parser reads it."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(parsed: dict, name: str, **labels: str) -> float:
    """One sample's value; 0 when it is absent (a counter not yet incremented)."""
    return parsed.get((name, frozenset(labels.items())), 0.0)


def scraped(server) -> dict[tuple[str, frozenset], float]:
    """Every sample the server exposes now."""
    status, text = scrape(server)
    assert status == 200, text
    return samples(text)
