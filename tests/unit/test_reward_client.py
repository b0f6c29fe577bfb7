"""RemoteReward (the reward-server client) against a tiny scripted HTTP server on 127.0.0.1 (real sockets, no
mocks): retries with backoff on 5xx/429/connection errors, the retry budget, the final error, chunking, 413
splitting, the API key and thread-safety."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from flowgrpo.rewards import build_reward
from flowgrpo.rewards.remote import RemoteReward, RewardServerError


class ScriptedServer:
    """Answers POST /v1/score. ``script`` is a list of (status, body, headers) used for the first requests; after
    that (or for a ``None`` entry) it scores for real: score = mean pixel value of each decoded PNG."""

    def __init__(self, script=None, max_images: int | None = None):
        self.script = list(script or [])
        self.max_images = max_images
        self.requests: list[dict] = []  # {"t", "n", "auth"}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                req = json.loads(body)
                n = len(req["images"])
                with outer.lock:
                    outer.requests.append({"t": time.monotonic(), "n": n, "auth": self.headers.get("Authorization")})
                    step = outer.script.pop(0) if outer.script else None
                if step is None and outer.max_images is not None and n > outer.max_images:
                    step = (413, {"error": f"{n} images exceeds the limit of {outer.max_images}"}, {})
                if step is None:
                    ims = [np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in req["images"]]
                    step = (200, {"reward": req["reward"], "scores": [float(im.mean()) for im in ims],
                                  "details": [{"p": p} for p in req["prompts"]]}, {})
                status, payload, headers = step
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _images(n: int, seed: int = 0, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _client(url: str, **kw) -> RemoteReward:
    opts = dict(transport="json", backoff_base_s=0.05, backoff_max_s=0.2, retry_budget_s=10, timeout_s=5,
                api_key_env="")
    opts.update(kw)
    return RemoteReward("ocr", url, **opts)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_retries_5xx_and_429_with_backoff_then_succeeds():
    err = (503, {"error": "overloaded"}, {})
    script = [err, (500, {"error": "boom"}, {}), (429, {"error": "slow down"}, {})]
    ims = _images(3)
    with ScriptedServer(script) as srv, _client(srv.url, backoff_base_s=0.1, backoff_max_s=1.0) as rr:
        out = rr(ims, ["a", "b", "c"], [{}] * 3)
        np.testing.assert_array_equal(out.scores, ims.reshape(3, -1).mean(1))
        assert [d["p"] for d in out.details] == ["a", "b", "c"]
        assert len(srv.requests) == 4 and rr.stats["retries"] == 3
        gaps = np.diff([r["t"] for r in srv.requests])
        # exponential backoff with jitter in [0.5, 1]: 0.1*2**k*[0.5, 1] for k = 0, 1, 2
        for k, g in enumerate(gaps):
            assert 0.1 * 2 ** k * 0.5 - 0.01 <= g <= 0.1 * 2 ** k + 0.5, (k, gaps)


def test_retry_after_is_honoured():
    with ScriptedServer([(429, {"error": "busy"}, {"Retry-After": "1"})]) as srv, _client(srv.url) as rr:
        t0 = time.monotonic()
        rr(_images(1), ["x"], [{}])
        assert time.monotonic() - t0 >= 0.95


def test_budget_exhausted_names_url_and_last_status():
    script = [(503, {"error": "model still warming up"}, {})] * 100
    with ScriptedServer(script) as srv, _client(srv.url, retry_budget_s=0.6, max_retries=100) as rr:
        t0 = time.monotonic()
        with pytest.raises(RewardServerError) as ei:
            rr(_images(2), ["a", "b"], [{}, {}])
        elapsed = time.monotonic() - t0
    e = ei.value
    assert isinstance(e, RuntimeError)
    assert 0.5 <= elapsed < 2.0
    msg = str(e)
    assert srv.url + "/v1/score" in msg and "HTTP 503" in msg and "model still warming up" in msg
    assert "retry budget" in msg and "'ocr'" in msg
    assert e.status == 503 and e.url == srv.url + "/v1/score" and e.attempts == len(srv.requests) >= 3


def test_max_retries_exhausted():
    with ScriptedServer([(502, {"error": "bad gateway"}, {})] * 10) as srv, _client(srv.url, max_retries=2) as rr:
        with pytest.raises(RewardServerError, match="max_retries=2") as ei:
            rr(_images(1), ["a"], [{}])
    assert ei.value.attempts == 3 and len(srv.requests) == 3


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_are_not_retried(status):
    with ScriptedServer([(status, {"error": f"nope {status}"}, {})]) as srv, _client(srv.url) as rr:
        with pytest.raises(RewardServerError) as ei:
            rr(_images(1), ["a"], [{}])
    assert len(srv.requests) == 1
    assert f"HTTP {status}" in str(ei.value) and f"nope {status}" in str(ei.value) and srv.url in str(ei.value)
    assert ei.value.status == status


def test_connection_refused_names_url_and_exception():
    url = f"http://127.0.0.1:{_free_port()}"
    with _client(url, retry_budget_s=0.5, max_retries=50) as rr:
        t0 = time.monotonic()
        with pytest.raises(RewardServerError) as ei:
            rr(_images(1), ["a"], [{}])
        assert time.monotonic() - t0 < 2.0
    msg = str(ei.value)
    assert url + "/v1/score" in msg and "ConnectionError" in msg and ei.value.status is None
    assert ei.value.attempts >= 3


def test_read_timeout_is_retried():
    # a listening socket that never answers: every attempt times out
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    url = f"http://127.0.0.1:{s.getsockname()[1]}"
    try:
        with _client(url, timeout_s=0.2, retry_budget_s=0.7, max_retries=50) as rr:
            with pytest.raises(RewardServerError) as ei:
                rr(_images(1), ["a"], [{}])
    finally:
        s.close()
    assert "Timeout" in str(ei.value) and ei.value.attempts >= 2


def test_chunking_and_order_with_parallel_chunks():
    ims = _images(23, seed=1)
    with ScriptedServer() as srv, _client(srv.url, chunk_size=5, max_parallel_chunks=3) as rr:
        out = rr(ims, [str(i) for i in range(23)], [{}] * 23)
    np.testing.assert_array_equal(out.scores, ims.reshape(23, -1).mean(1))
    assert [d["p"] for d in out.details] == [str(i) for i in range(23)]
    assert sorted(r["n"] for r in srv.requests) == [3, 5, 5, 5, 5]


def test_413_halves_the_chunk():
    ims = _images(8, seed=2)
    with ScriptedServer(max_images=2) as srv, _client(srv.url, chunk_size=8) as rr:
        out = rr(ims, [""] * 8, [{}] * 8)
    np.testing.assert_array_equal(out.scores, ims.reshape(8, -1).mean(1))
    assert [r["n"] for r in srv.requests][:3] == [8, 4, 2]
    with ScriptedServer([(413, {"error": "image too big"}, {})]) as srv, _client(srv.url) as rr:
        with pytest.raises(RewardServerError, match="HTTP 413.*image too big"):
            rr(_images(1), [""], [{}])


def test_thread_safe_concurrent_calls():
    with ScriptedServer() as srv, _client(srv.url, chunk_size=4) as rr:
        def one(seed):
            ims = _images(6, seed=seed)
            out = rr(ims, [f"{seed}-{i}" for i in range(6)], [{}] * 6)
            np.testing.assert_array_equal(out.scores, ims.reshape(6, -1).mean(1))
            assert [d["p"] for d in out.details] == [f"{seed}-{i}" for i in range(6)]
            return True

        with ThreadPoolExecutor(8) as ex:
            assert all(ex.map(one, range(32)))
    assert len(srv.requests) == 64


def test_api_key_sent_but_never_shown(monkeypatch):
    monkeypatch.setenv("FLOWGRPO_REWARD_API_KEY", "s3cret-key")
    with ScriptedServer([(500, {"error": "x"}, {})] * 5) as srv:
        rr = RemoteReward("ocr", srv.url, transport="json", retry_budget_s=0.2, backoff_base_s=0.05)
        with pytest.raises(RewardServerError) as ei:
            rr(_images(1), ["a"], [{}])
        rr.close()
    assert srv.requests[0]["auth"] == "Bearer s3cret-key"
    assert "s3cret-key" not in str(ei.value) and "s3cret-key" not in repr(rr)
    explicit = RemoteReward("ocr", srv.url, api_key="other")
    assert "other" not in repr(explicit)


def test_malformed_200_response():
    with ScriptedServer([(200, {"scores": [1.0]}, {})]) as srv, _client(srv.url) as rr:
        with pytest.raises(RewardServerError, match="malformed response"):
            rr(_images(2), ["a", "b"], [{}, {}])


def test_build_reward_with_url_gives_remote_for_any_name():
    r = build_reward("deqa", url="http://127.0.0.1:1", timeout_s=3, chunk_size=4)
    assert isinstance(r, RemoteReward) and r.name == "deqa" and r.url == "http://127.0.0.1:1/v1/score"
    assert RemoteReward("x", "http://h:1/v1/score/").url == "http://h:1/v1/score"
    with pytest.raises(ValueError, match="http"):
        RemoteReward("x", "h:1")


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 13, 3), (300, 260, 3)])
def test_png_encoding_is_lossless(level, shape):
    from flowgrpo.rewards.remote import encode_image

    a = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    im = Image.open(io.BytesIO(encode_image(a, "png", png_compress_level=level)))
    assert im.format == "PNG" and im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), a)
