"""VLM-judge rewards (unifiedreward, qwenvl) against a fake OpenAI-compatible endpoint on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

import flowgrpo.rewards.vlm as vlm
from flowgrpo.rewards.base import REGISTRY, build_reward


class FakeChatServer:
    """Answers POST /v1/chat/completions. ``answer(text_prompt) -> str`` picks the reply; every request body is
    validated and kept in ``requests``; ``fail_first`` requests get HTTP 500 first."""

    def __init__(self, answer, fail_first: int = 0, status: int = 200):
        self.answer = answer
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.errors: list[str] = []
        self.fail_first = fail_first
        self.status = status
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append(body)
                    outer.headers.append(dict(self.headers))
                    n = len(outer.requests)
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                if n <= outer.fail_first:
                    return self._send(500, {"error": "busy"})
                if outer.status != 200:
                    return self._send(outer.status, {"error": "bad model"})
                try:
                    text = outer.check(body)
                except AssertionError as e:  # reported to the test thread
                    outer.errors.append(str(e))
                    return self._send(400, {"error": str(e)})
                self._send(200, {"id": "x", "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": outer.answer(text)},
                     "finish_reason": "stop"}]})

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def check(self, body: dict) -> str:
        assert body["temperature"] == 0, body["temperature"]
        assert isinstance(body["model"], str) and body["model"]
        (msg,) = body["messages"]
        assert msg["role"] == "user"
        kinds = [p["type"] for p in msg["content"]]
        assert sorted(kinds) == ["image_url", "text"], kinds
        url = next(p for p in msg["content"] if p["type"] == "image_url")["image_url"]["url"]
        prefix = "data:image/png;base64,"
        assert url.startswith(prefix), url[:40]
        im = Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))
        assert im.format == "PNG" and im.size == (512, 512), (im.format, im.size)
        return next(p for p in msg["content"] if p["type"] == "text")["text"]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _images(n: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_registered():
    assert "unifiedreward" in REGISTRY and "qwenvl" in REGISTRY


def test_unifiedreward_parsing_and_request_shape(monkeypatch):
    answers = {
        "a red cat": "The cat is red. Alignment good.\nFinal Score: 4",
        "a blue dog": "Mostly right.\nFinal Score: 3.5",
        "garbage": "I cannot rate this image.",
        "too high": "Final Score: 7",
        "markdown": "Format is 'Final Score: <rating>'.\n**Final Score:** 5",
    }

    def answer(text: str) -> str:
        for k, v in answers.items():
            if f"Caption: {k}\n" in text:
                return v
        return "??"

    monkeypatch.setenv("FLOWGRPO_VLM_API_KEY", "sekret")
    with FakeChatServer(answer) as srv:
        r = build_reward("unifiedreward", base_url=srv.base_url, max_workers=4)
        prompts = list(answers)
        out = r(_images(len(prompts), size=96), prompts, [{}] * len(prompts))
        assert not srv.errors, srv.errors
    np.testing.assert_allclose(out.scores, [0.8, 0.7, 0.0, 0.0, 1.0])
    assert out.scores.shape == (5,)
    assert out.details[2]["reason"] == "unparsable" and out.details[2]["raw"] == answers["garbage"]
    assert out.details[3]["reason"] == "out of range" and out.details[3]["value"] == 7.0
    assert out.details[0]["raw"] == answers["a red cat"]
    assert len(srv.requests) == 5
    assert {b["model"] for b in srv.requests} == {"CodeGoat24/UnifiedReward-7b-v1.5"}
    assert all(h.get("Authorization") == "Bearer sekret" for h in srv.headers)
    assert all("sekret" not in json.dumps(d) for d in out.details)


def test_qwenvl_parsing(monkeypatch):
    cases = ["<Score>5</Score>", "<score> 2 </score>", "It is nice. <Score>3.5</Score>", "Score: 4",
             "<Score>0</Score>", "<Score>6</Score>"]
    replies = iter(cases)  # max_workers=1: requests arrive in order
    monkeypatch.delenv("FLOWGRPO_VLM_API_KEY", raising=False)

    def answer(text: str) -> str:
        assert "<Score>" in text
        return next(replies)

    with FakeChatServer(answer) as srv:
        r = build_reward("qwenvl", base_url=srv.base_url, model="my-qwen", max_workers=1)
        out = r(_images(len(cases)), ["p"] * len(cases), [{}] * len(cases))
        assert not srv.errors, srv.errors
        assert all("Authorization" not in h for h in srv.headers)
        assert {b["model"] for b in srv.requests} == {"my-qwen"}
    np.testing.assert_allclose(out.scores, [1.0, 0.4, 0.7, 0.0, 0.0, 0.0])
    assert [d.get("reason") for d in out.details] == [None, None, None, "unparsable", "out of range", "out of range"]


def test_retries_on_server_error():
    with FakeChatServer(lambda t: "Final Score: 2", fail_first=2) as srv:
        r = build_reward("unifiedreward", base_url=srv.base_url, retries=3, backoff=0.01, max_workers=1)
        out = r(_images(1), ["x"], [{}])
        assert len(srv.requests) == 3
    np.testing.assert_allclose(out.scores, [0.4])


def test_http_4xx_fails_fast_naming_url():
    with FakeChatServer(lambda t: "", status=404) as srv:
        r = build_reward("qwenvl", base_url=srv.base_url, retries=3, backoff=0.01)
        with pytest.raises(vlm.VlmEndpointError, match=r"127\.0\.0\.1.*404"):
            r(_images(1), ["x"], [{}])
        assert len(srv.requests) == 1


def test_dead_endpoint_clear_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/v1"
    r = build_reward("unifiedreward", base_url=url, retries=1, backoff=0.01, timeout=2)
    with pytest.raises(vlm.VlmEndpointError) as ei:
        r(_images(2), ["a", "b"], [{}, {}])
    assert f"{url}/chat/completions" in str(ei.value) and "2 attempts" in str(ei.value)


def test_parse_score_unit():
    assert vlm.parse_score("Final Score: 5", vlm.FINAL_SCORE_RE)[0] == 1.0
    assert vlm.parse_score("final score：1", vlm.FINAL_SCORE_RE)[0] == pytest.approx(0.2)
    assert vlm.parse_score(None, vlm.FINAL_SCORE_RE) == (0.0, {"raw": None, "reason": "unparsable"})
    assert vlm.parse_score("Final Score: -3", vlm.FINAL_SCORE_RE)[1]["reason"] == "out of range"
    assert vlm.parse_score("<Score>4</Score> then <Score>2</Score>", vlm.TAG_SCORE_RE)[0] == pytest.approx(0.4)


def test_encode_image_png_512():
    url = vlm.encode_image(_images(1, size=40)[0], 512)
    im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert im.size == (512, 512) and im.mode == "RGB"
