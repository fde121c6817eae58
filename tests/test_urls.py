"""The one URL rule (`components/urls.py`): an absolute http(s) URL with a host, as a real parser reads it."""

import pytest

from components.urls import is_http_url, parse_http_url


@pytest.mark.parametrize(
    "url", ["http://example.com", "https://example.com:8443/path?q=1", "http://127.0.0.1:1416", "http://[::1]/x"]
)
def test_accepted(url):
    assert is_http_url(url)
    assert parse_http_url(url).hostname


@pytest.mark.parametrize(
    "url",
    ["http://", "https://", "http:///path", "https:/example.com", "ftp://example.com", "example.com", "//example.com",
     "http://example.com:port", "http://example.com:99999", "httpx://example.com", "", None, 42],
)  # fmt: skip
def test_refused(url):
    assert not is_http_url(url)
