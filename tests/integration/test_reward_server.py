"""The reward server over real HTTP on 127.0.0.1 (uvicorn in a thread, or a killed/restarted subprocess): remote
scores equal in-process scores, 401/400/404/413/503 with useful messages, dynamic batching, /readyz while models
load, /metrics, and the client riding through a server restart (or failing clearly when there is none)."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from flowgrpo.rewards import REGISTRY, RewardOutput, WeightedReward, build_reward
from flowgrpo.rewards.remote import RemoteReward, RewardServerError
from flowgrpo.rewards.server import create_app

REPO = Path(__file__).resolve().parents[2]
KEY = "test-key-123"
JPEG = "jpeg_compressibility"


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@contextmanager
def serving(rewards, api_key=KEY, wait_ready=True, **kw):
    """create_app(...) under uvicorn in a daemon thread; yields (base url, app)."""
    import uvicorn

    app = create_app(rewards, api_key, insecure_no_auth=api_key is None, **kw)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and t.is_alive(), "server did not start"
        time.sleep(0.01)
    if wait_ready:
        while requests.get(url + "/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.02)
    try:
        yield url, app
    finally:
        server.should_exit = True
        t.join(timeout=10)


def _images(n, seed=0, size=32):
    """Smooth-ish images with noise (JPEG sizes differ between images)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for i in range(n):
        base = (np.sin(xx / (2 + i % 5)) + np.cos(yy / (3 + i % 7))) * 60 + 128
        im = np.stack([base, base[::-1], base.T], -1) + rng.normal(0, 5 + 3 * i, (size, size, 3))
        out.append(np.clip(im, 0, 255).astype(np.uint8))
    return np.stack(out)


def _b64png(im: np.ndarray, fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _post(url, payload=None, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(url + "/v1/score", json=payload, headers=headers, timeout=30, **kw)


class MeanReward:
    """Test reward: score = mean pixel value; records the batch sizes it sees."""

    name = "_test_mean"

    def __init__(self, load_event: threading.Event | None = None, fail_on: str | None = None):
        if load_event is not None:
            load_event.wait(20)  # "loading a model"
            time.sleep(0.1)
        self.fail_on = fail_on
        self.batches: list[int] = []

    def __call__(self, images, prompts, metadata):
        self.batches.append(len(images))
        if self.fail_on is not None and self.fail_on in prompts:
            raise RuntimeError(f"cannot score prompt {self.fail_on!r}")
        return RewardOutput(images.reshape(len(images), -1).mean(1).astype(np.float64),
                            [{"prompt": p, "tag": m.get("tag")} for p, m in zip(prompts, metadata)])


@pytest.fixture
def mean_reward(monkeypatch):
    monkeypatch.setitem(REGISTRY, "_test_mean", MeanReward)
    return "_test_mean"


# ---------------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("transport", ["multipart", "json"])
def test_http_scores_equal_in_process(transport):
    ims = _images(11, seed=1)
    prompts = [f"p{i}" for i in range(11)]
    meta = [{"i": i} for i in range(11)]
    with serving([JPEG, "jpeg_incompressibility"]) as (url, _):
        for name in (JPEG, "jpeg_incompressibility"):
            with RemoteReward(name, url, api_key=KEY, chunk_size=4, transport=transport) as rr:
                remote = rr(ims, prompts, meta)
            local = build_reward(name)(ims, prompts, meta)
            np.testing.assert_array_equal(remote.scores, local.scores)  # exact: PNG is lossless
            assert remote.details == local.details
        # the same through build_reward(url=...) and the trainer's WeightedReward
        w = WeightedReward({JPEG: 1.0, "jpeg_incompressibility": 0.5},
                           options={JPEG: {"url": url, "api_key": KEY}, "jpeg_incompressibility": {}})
        assert isinstance(w.rewards[JPEG], RemoteReward)
        out = w(ims, prompts, meta)
        loc = WeightedReward({JPEG: 1.0, "jpeg_incompressibility": 0.5})(ims, prompts, meta)
        for k in loc:
            np.testing.assert_array_equal(out[k], loc[k])


def test_reference_images_travel_inline_and_paths_are_refused(tmp_path):
    """image_similarity on a server in another pod: the client sends each row's local source image inline (a data
    URI), so remote scores equal in-process ones; other rewards get no path at all; a path sent by hand is refused
    with 400 (the server never opens a path a request names)."""
    from flowgrpo.rewards.testing import cached_tiny_clip

    clip = {"model": str(cached_tiny_clip()), "device": "cpu"}
    ims = _images(4, seed=3)
    sources = []
    for name, arr in (("a.png", ims[1]), ("b.jpg", ims[2])):
        Image.fromarray(arr).save(tmp_path / name)
        sources.append(str(tmp_path / name))
    meta = [{"image": sources[i // 2], "tag": i} for i in range(4)]
    prompts = ["p"] * 4
    with serving(["image_similarity", JPEG], reward_options={"image_similarity": clip}) as (url, _):
        with RemoteReward("image_similarity", url, api_key=KEY, chunk_size=3) as rr:
            remote = rr(ims, prompts, meta)
            with pytest.raises(FileNotFoundError, match="metadata\\[0\\].image"):
                rr(ims[:1], prompts[:1], [{"image": str(tmp_path / "gone.png")}])
        local = build_reward("image_similarity", **clip)(ims, prompts, meta)
        np.testing.assert_allclose(remote.scores, local.scores, rtol=0, atol=1e-6)
        assert remote.scores[1] > remote.scores[0] and remote.scores[1] > 0.999  # image 1 is its own source
        assert meta[0]["image"] == sources[0]  # the caller's rows are not modified
        with RemoteReward(JPEG, url, api_key=KEY) as rj:  # no reference reward: the path is dropped, not refused
            np.testing.assert_array_equal(rj(ims, prompts, meta).scores, build_reward(JPEG)(ims, prompts, meta).scores)
        for bad in ("/etc/hostname", "file:///etc/hostname", "data:image/png;base64,@@@", None):
            r = _post(url, {"reward": "image_similarity", "images": [_b64png(ims[0])], "metadata": [{"image": bad}]})
            assert r.status_code == 400 and r.json()["index"] == 0, r.text
            assert "metadata[0].image" in r.json()["error"]


def test_deqa_through_the_remote_protocol(monkeypatch):
    """deqa has no in-process implementation in this build: it exists through a server serving that name."""
    monkeypatch.setitem(REGISTRY, "deqa", MeanReward)  # stands in for the DeQA model on the server side
    ims = _images(5, seed=2)
    with serving(["deqa"]) as (url, _):
        monkeypatch.delitem(REGISTRY, "deqa")  # the trainer side has no deqa model
        with pytest.raises(ValueError, match="not available"):
            build_reward("deqa")
        w = WeightedReward({"deqa": 1.0}, options={"deqa": {"url": url, "api_key": KEY}})
        out = w(ims, ["a"] * 5, [{}] * 5)
    np.testing.assert_array_equal(out["deqa"], ims.reshape(5, -1).mean(1))


def test_dynamic_batching_across_concurrent_requests(mean_reward):
    with serving([mean_reward], max_batch=16, max_wait_ms=300) as (url, app):
        reward = app.state.batchers[mean_reward].reward
        barrier = threading.Barrier(4)

        def one(seed):
            ims = _images(3, seed=seed, size=16)
            with RemoteReward(mean_reward, url, api_key=KEY) as rr:
                barrier.wait()
                out = rr(ims, [f"{seed}"] * 3, [{"tag": seed}] * 3)
            np.testing.assert_array_equal(out.scores, ims.reshape(3, -1).mean(1))
            assert [d["tag"] for d in out.details] == [seed] * 3
            return True

        with ThreadPoolExecutor(4) as ex:
            assert all(ex.map(one, range(4)))
        assert max(reward.batches) > 3, reward.batches  # requests were merged into one model call
        assert sum(reward.batches) == 12
        # a request larger than max_batch is split into model batches of at most max_batch
        reward.batches.clear()
        r = _post(url, {"reward": mean_reward, "images": [_b64png(im) for im in _images(20, size=8)]})
        assert r.status_code == 200 and len(r.json()["scores"]) == 20
        assert max(reward.batches) <= 16 and sum(reward.batches) == 20
        assert r.json()["server"]["batch_sizes"]


def test_mixed_image_sizes_are_batched_separately(mean_reward):
    with serving([mean_reward], max_batch=32, max_wait_ms=200) as (url, _):
        sizes = [8, 16, 8, 16]

        def one(i):
            ims = _images(2, seed=i, size=sizes[i])
            with RemoteReward(mean_reward, url, api_key=KEY) as rr:
                np.testing.assert_array_equal(rr(ims, ["x", "y"], [{}, {}]).scores, ims.reshape(2, -1).mean(1))
            return True

        with ThreadPoolExecutor(4) as ex:
            assert all(ex.map(one, range(4)))


def test_reward_error_is_500_and_isolated(mean_reward, monkeypatch):
    monkeypatch.setitem(REGISTRY, "_test_mean", lambda: MeanReward(fail_on="boom"))
    with serving([mean_reward], max_wait_ms=200) as (url, _):
        ims = [_b64png(im) for im in _images(2, size=8)]
        with ThreadPoolExecutor(2) as ex:
            bad = ex.submit(_post, url, {"reward": mean_reward, "images": ims, "prompts": ["ok", "boom"]})
            good = ex.submit(_post, url, {"reward": mean_reward, "images": ims, "prompts": ["ok", "fine"]})
            bad, good = bad.result(), good.result()
        assert good.status_code == 200
        assert bad.status_code == 500 and "cannot score prompt 'boom'" in bad.json()["error"]


# ---------------------------------------------------------------------------------------------- errors
def test_401_without_or_with_wrong_key(monkeypatch):
    payload = {"reward": JPEG, "images": [_b64png(_images(1)[0])]}
    with serving([JPEG]) as (url, _):
        r = _post(url, payload, key=None)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]
        assert "FLOWGRPO_REWARD_API_KEY" in r.json()["error"]
        r = _post(url, payload, key="wrong")
        assert r.status_code == 401 and "invalid API key" in r.json()["error"]
        assert _post(url, payload).status_code == 200
        # the client: the key from the environment works; without a key -> RewardServerError, not retried
        monkeypatch.setenv("FLOWGRPO_REWARD_API_KEY", KEY)
        with RemoteReward(JPEG, url) as rr:
            assert rr(_images(1), [""], [{}]).scores.shape == (1,)
        monkeypatch.delenv("FLOWGRPO_REWARD_API_KEY")
        with RemoteReward(JPEG, url) as rr, pytest.raises(RewardServerError, match="HTTP 401") as ei:
            rr(_images(1), [""], [{}])
        assert ei.value.attempts == 1 and url in str(ei.value)
        # probes and metrics need no key
        for path in ("/healthz", "/readyz", "/metrics"):
            assert requests.get(url + path, timeout=5).status_code == 200
    with pytest.raises(ValueError, match="FLOWGRPO_REWARD_API_KEY"):
        create_app([JPEG], None)
    with serving([JPEG], api_key=None) as (url, _):  # --insecure-no-auth
        assert _post(url, payload, key=None).status_code == 200


def test_400_malformed_images_name_the_index():
    ims = _images(3, size=16)
    good = _b64png(ims[0])
    gif = io.BytesIO()
    Image.fromarray(ims[0]).save(gif, format="GIF")
    with serving([JPEG]) as (url, _):
        r = _post(url, {"reward": JPEG, "images": [good, base64.b64encode(b"not an image").decode(), good]})
        assert r.status_code == 400 and "image 1" in r.json()["error"] and r.json()["index"] == 1
        r = _post(url, {"reward": JPEG, "images": [good, good, "@@@not-base64"]})
        assert r.status_code == 400 and "image 2" in r.json()["error"] and "base64" in r.json()["error"]
        r = _post(url, {"reward": JPEG, "images": [good, base64.b64encode(gif.getvalue()).decode()]})
        assert r.status_code == 400 and "image 1" in r.json()["error"] and "PNG/JPEG" in r.json()["error"]
        r = _post(url, {"reward": JPEG, "images": [good, _b64png(_images(1, size=8)[0])]})
        assert r.status_code == 400 and "image 1" in r.json()["error"] and "size" in r.json()["error"]
        r = _post(url, {"reward": JPEG, "images": [good], "prompts": ["a", "b"]})
        assert r.status_code == 400 and "'prompts'" in r.json()["error"]
        r = requests.post(url + "/v1/score", data=b"{nope", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
        assert r.status_code == 400 and "JSON" in r.json()["error"]
        # multipart: a broken image part is named by its index too
        files = [("request", ("r.json", b'{"reward": "%s"}' % JPEG.encode(), "application/json")),
                 ("images", ("0.png", base64.b64decode(good), "image/png")),
                 ("images", ("1.png", b"\x89PNG garbage", "image/png"))]
        r = requests.post(url + "/v1/score", files=files, headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
        assert r.status_code == 400 and "image 1" in r.json()["error"]
        # JPEG input is accepted (lossy, so scores differ slightly from the PNG path)
        r = _post(url, {"reward": JPEG, "images": [_b64png(ims[0], "JPEG")]})
        assert r.status_code == 200


def test_404_unknown_reward_lists_the_served_ones():
    with serving([JPEG]) as (url, _):
        r = _post(url, {"reward": "pickscore", "images": [_b64png(_images(1)[0])]})
        assert r.status_code == 404
        body = r.json()
        assert "'pickscore'" in body["error"] and JPEG in body["error"] and body["served"] == [JPEG]
        with RemoteReward("ocr", url, api_key=KEY) as rr, pytest.raises(RewardServerError, match="HTTP 404"):
            rr(_images(1), [""], [{}])
    with pytest.raises(ValueError, match="cannot serve reward 'no_such_reward'"):
        create_app(["no_such_reward"], KEY)


def test_413_request_and_batch_limits():
    with serving([JPEG], max_request_bytes=50_000, max_images_per_request=4) as (url, _):
        big = [_b64png(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))]
        r = _post(url, {"reward": JPEG, "images": big})
        assert r.status_code == 413 and "50000 bytes" in r.json()["error"]
        small = [_b64png(im) for im in _images(5, size=8)]
        r = _post(url, {"reward": JPEG, "images": small})
        assert r.status_code == 413 and "5 images" in r.json()["error"] and "limit of 4" in r.json()["error"]
        # the client halves its chunk on 413 and still gets every score
        ims = _images(8, size=8)
        with RemoteReward(JPEG, url, api_key=KEY, chunk_size=8) as rr:
            np.testing.assert_array_equal(rr(ims, [""] * 8, [{}] * 8).scores,
                                          build_reward(JPEG)(ims, [""] * 8, [{}] * 8).scores)


# ---------------------------------------------------------------------------------------------- readiness, metrics
def test_readyz_503_until_models_load(mean_reward, monkeypatch):
    loaded = threading.Event()
    monkeypatch.setitem(REGISTRY, "_test_mean", lambda: MeanReward(load_event=loaded))
    with serving([mean_reward], wait_ready=False) as (url, _):
        assert requests.get(url + "/healthz", timeout=5).status_code == 200  # alive while loading
        r = requests.get(url + "/readyz", timeout=5)
        assert r.status_code == 503 and r.json() == {"ready": False, "rewards": {mean_reward: "loading"}}
        r = _post(url, {"reward": mean_reward, "images": [_b64png(_images(1)[0])]})
        assert r.status_code == 503 and "still loading" in r.json()["error"] and r.headers["Retry-After"]
        # a client call made while loading rides through (503 is retried) and completes once loaded
        ims = _images(2)
        with ThreadPoolExecutor(1) as ex, RemoteReward(mean_reward, url, api_key=KEY, backoff_base_s=0.05,
                                                       backoff_max_s=0.2) as rr:
            fut = ex.submit(rr, ims, ["a", "b"], [{}, {}])
            time.sleep(0.3)
            assert not fut.done()
            loaded.set()
            np.testing.assert_array_equal(fut.result(timeout=20).scores, ims.reshape(2, -1).mean(1))
            rr.wait_ready(5)
        r = requests.get(url + "/readyz", timeout=5)
        assert r.status_code == 200 and r.json()["ready"] is True


def test_failed_load_is_reported(monkeypatch):
    def broken():
        raise OSError("weights not found at /models/x")

    monkeypatch.setitem(REGISTRY, "_test_mean", broken)
    with serving(["_test_mean"], wait_ready=False) as (url, _):
        deadline = time.monotonic() + 5
        while "failed" not in requests.get(url + "/readyz", timeout=5).text:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = requests.get(url + "/readyz", timeout=5)
        assert r.status_code == 503 and "weights not found" in r.json()["rewards"]["_test_mean"]
        r = _post(url, {"reward": "_test_mean", "images": [_b64png(_images(1)[0])]})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]


def test_metrics_content(mean_reward):
    with serving([mean_reward], max_batch=8, max_wait_ms=1) as (url, _):
        with RemoteReward(mean_reward, url, api_key=KEY, chunk_size=5, max_parallel_chunks=1) as rr:
            rr(_images(7, size=8), [""] * 7, [{}] * 7)
        _post(url, {"reward": mean_reward, "images": [_b64png(_images(1)[0])]}, key="bad")
        _post(url, {"reward": "nope", "images": []})
        _post(url, {"reward": mean_reward, "images": ["!!"]})
        r = requests.get(url + "/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    lines = set(text.splitlines())
    assert f'flowgrpo_reward_requests_total{{reward="{mean_reward}",code="200"}} 2' in lines
    assert 'flowgrpo_reward_requests_total{reward="_unknown",code="401"} 1' in lines
    assert 'flowgrpo_reward_requests_total{reward="_unknown",code="404"} 1' in lines
    assert f'flowgrpo_reward_requests_total{{reward="{mean_reward}",code="400"}} 1' in lines
    assert 'flowgrpo_reward_errors_total{reward="_unknown",kind="auth"} 1' in lines
    assert f'flowgrpo_reward_errors_total{{reward="{mean_reward}",kind="bad_image"}} 1' in lines
    assert f'flowgrpo_reward_images_total{{reward="{mean_reward}"}} 7' in lines
    assert f'flowgrpo_reward_request_latency_seconds_count{{reward="{mean_reward}"}} 3' in lines
    assert f'flowgrpo_reward_batch_size_bucket{{reward="{mean_reward}",le="+Inf"}} 2' in lines
    assert f'flowgrpo_reward_batch_size_sum{{reward="{mean_reward}"}} 7.000000' in lines
    assert f'flowgrpo_reward_ready{{reward="{mean_reward}"}} 1' in lines
    assert "# TYPE flowgrpo_reward_request_latency_seconds histogram" in lines
    assert "# TYPE flowgrpo_reward_inference_seconds histogram" in lines
    assert "# TYPE flowgrpo_reward_queue_depth gauge" in lines
    assert KEY not in text and "bad" not in text.replace("bad_image", "")


# ---------------------------------------------------------------------------------------------- faults (subprocess)
_SERVER_CODE = textwrap.dedent("""
    import sys, time
    from flowgrpo.rewards import REGISTRY
    from flowgrpo.rewards.jpeg import JpegCompressibility

    class SlowJpeg(JpegCompressibility):  # 0.25 s per model call, so a client call spans several requests
        def __call__(self, images, prompts, metadata):
            time.sleep(0.25)
            return super().__call__(images, prompts, metadata)

    REGISTRY["_slow_jpeg"] = SlowJpeg
    from flowgrpo.rewards.server import main
    sys.exit(main(sys.argv[1:]))
""")


def _start_server_process(port: int) -> subprocess.Popen:
    env = {**os.environ, "FLOWGRPO_REWARD_API_KEY": KEY, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", _SERVER_CODE, "--reward", "_slow_jpeg", "--host", "127.0.0.1",
                             "--port", str(port), "--max-wait-ms", "1", "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def test_client_survives_server_kill_and_restart():
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    procs = [_start_server_process(port)]
    try:
        rr = RemoteReward("_slow_jpeg", url, api_key=KEY, chunk_size=2, max_parallel_chunks=1, retry_budget_s=30, max_retries=1000,
                          backoff_base_s=0.1, backoff_max_s=0.5, timeout_s=10)
        rr.wait_ready(20, poll_s=0.05)
        ims = _images(12, seed=3)
        prompts = [f"p{i}" for i in range(12)]
        expected = build_reward(JPEG)(ims, prompts, [{}] * 12)
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(rr, ims, prompts, [{}] * 12)  # 6 requests of ~0.25 s each
            time.sleep(0.6)  # a couple of requests done, one in flight
            _kill(procs[0])  # really kill the server process mid-call
            assert not fut.done()
            time.sleep(0.5)
            procs.append(_start_server_process(port))  # restarted within the retry budget
            out = fut.result(timeout=40)
        np.testing.assert_array_equal(out.scores, expected.scores)
        assert out.details == expected.details
        assert rr.stats["retries"] >= 1

        # killed and not restarted: a clear error naming the URL and the last exception, within the budget
        _kill(procs[-1])
        rr2 = RemoteReward("_slow_jpeg", url, api_key=KEY, retry_budget_s=1.0, backoff_base_s=0.1, backoff_max_s=0.3)
        t0 = time.monotonic()
        with pytest.raises(RewardServerError) as ei:
            rr2(ims[:2], prompts[:2], [{}, {}])
        assert time.monotonic() - t0 < 4
        msg = str(ei.value)
        assert url + "/v1/score" in msg and "ConnectionError" in msg and "retry budget" in msg
        assert KEY not in msg
        rr.close()
        rr2.close()
    finally:
        for p in procs:
            _kill(p)
            if p.stderr:
                p.stderr.close()


def test_serve_cli_refuses_to_start_without_a_key(monkeypatch, capsys, tmp_path):
    from flowgrpo.rewards.server import main, resolve_api_key

    monkeypatch.delenv("FLOWGRPO_REWARD_API_KEY", raising=False)
    assert main(["--reward", JPEG, "--port", "1"]) == 2
    assert "FLOWGRPO_REWARD_API_KEY" in capsys.readouterr().err
    assert main(["--reward", "no_such_reward", "--insecure-no-auth", "--port", "1"]) == 2
    assert "cannot serve reward 'no_such_reward'" in capsys.readouterr().err
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("FLOWGRPO_REWARD_API_KEY", "from-env")
    assert resolve_api_key(str(key_file), False) == "from-file"
    assert resolve_api_key(None, False) == "from-env"
