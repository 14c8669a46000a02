"""``stepvideo.caption_service.client.normalize_service_url``: the accepted service address spellings."""
from __future__ import annotations

import pytest

from stepvideo.caption_service.client import normalize_service_url


@pytest.mark.parametrize("url, want", [
    ("127.0.0.1", "http://127.0.0.1:8080"),
    ("gpu-7", "http://gpu-7:8080"),
    ("gpu-7:9000", "http://gpu-7:9000"),
    ("http://gpu-7:9000/", "http://gpu-7:9000"),
    ("http://gpu-7", "http://gpu-7:8080"),
    ("https://proxy.example/stepvideo/", "https://proxy.example:8080/stepvideo"),
    ("::1", "http://[::1]:8080"),
    ("[::1]:9000", "http://[::1]:9000"),
    (" 10.0.0.5 ", "http://10.0.0.5:8080"),
])
def test_normalize_service_url(url, want):
    assert normalize_service_url(url) == want


@pytest.mark.parametrize("url", ["", "ftp://host", "host:http", "host:70000", "http://", "a b"])
def test_normalize_service_url_rejects(url):
    with pytest.raises(ValueError):
        normalize_service_url(url)
