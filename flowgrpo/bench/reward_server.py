"""``flowgrpo bench reward-server``: reward throughput through the HTTP reward server vs in-process.

For each reward (default: ``jpeg_compressibility`` and ``ocr`` when it can be built) and batch size (default 1, 8,
32), on synthetic ``--resolution`` images with rendered text (so OCR has work to do):

* ``inproc_1``: one caller, ``reward(images)`` in this process (the trainer's in-process path);
* ``inproc_N``: ``--clients`` threads sharing one reward instance (as the recipe's reward thread pool does);
* ``remote_1``: one ``RemoteReward`` client against a server subprocess (``flowgrpo serve-reward``, PNG multipart);
* ``remote_N``: ``--clients`` concurrent clients (each its own ``RemoteReward``), dynamic batching on the server.

Each phase repeats calls until ``--min-seconds`` have passed (at least one call per client). Reported per case:
images/s of every phase, ms per image, the server's overhead per image (``remote_1`` latency per image minus
``inproc_1`` time per image), the client's PNG encoding share of it, the mean model batch the server formed, and
whether remote scores equal in-process scores exactly. The server runs in a subprocess on 127.0.0.1 so client and
server do not share a GIL (they do share the machine's cores: see ``cpu_count``).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

import numpy as np

DEFAULT_REWARDS = ("jpeg_compressibility", "ocr")


def _arg(args: Any, name: str, default: Any) -> Any:
    v = getattr(args, name, None)
    return default if v is None else v


def _ints(v: Any) -> list[int]:
    if isinstance(v, str):
        return [int(x) for x in v.split(",") if x.strip()]
    return [int(x) for x in v]


def _names(v: Any) -> list[str]:
    if isinstance(v, str):
        return [x.strip() for x in v.split(",") if x.strip()]
    return list(v)


def bench_images(n: int, resolution: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` distinct uint8 [R, R, 3] images (smooth background, mild noise, a dark word in the middle) and prompts
    quoting that word."""
    from PIL import Image, ImageDraw, ImageFont

    words = ["hello", "flow", "reward", "server", "batch", "image", "score", "train"]
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:resolution, 0:resolution] / resolution
    try:
        font = ImageFont.load_default(size=max(8, resolution // 10))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    images, prompts = [], []
    for i in range(n):
        phase = rng.uniform(0, 6.28)
        bg = np.stack([200 * xx + 30 + 20 * np.sin(6 * yy + phase), 180 * yy + 40, 120 + 80 * xx * yy], -1)
        bg += rng.normal(0, 6, bg.shape)
        im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
        word = f"{words[i % len(words)]} {i}"
        ImageDraw.Draw(im).text((resolution // 10, resolution // 2 - resolution // 20), word, fill=(10, 10, 10),
                                font=font)
        images.append(np.asarray(im))
        prompts.append(f'a sign that says "{word}"')
    return np.stack(images), prompts


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _repeat(fn, min_seconds: float, min_calls: int = 1) -> tuple[int, float]:
    """Call ``fn`` until ``min_seconds`` have passed (and at least ``min_calls`` times) -> (calls, seconds)."""
    calls, t0 = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < min_seconds:
        fn()
        calls += 1
    return calls, time.perf_counter() - t0


def _concurrent(fns: Sequence, min_seconds: float) -> tuple[int, float]:
    """Every fn in its own thread, each repeating until the shared deadline -> (total calls, wall seconds)."""
    counts = [0] * len(fns)
    errors: list[BaseException] = []
    start = threading.Barrier(len(fns) + 1)
    t_end = [0.0]

    def worker(i: int) -> None:
        try:
            start.wait()
            while counts[i] < 1 or time.perf_counter() < t_end[0]:
                fns[i]()
                counts[i] += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    t_end[0] = t0 + min_seconds
    start.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts), time.perf_counter() - t0


def _metric_sums(base_url: str, reward: str) -> tuple[float, float]:
    """(sum, count) of the server's flowgrpo_reward_batch_size histogram for ``reward``."""
    import requests

    text = requests.get(base_url + "/metrics", timeout=10).text
    out = []
    for suffix in ("sum", "count"):
        m = re.search(rf'^flowgrpo_reward_batch_size_{suffix}{{reward="{re.escape(reward)}"}} (\S+)$', text, re.M)
        out.append(float(m.group(1)) if m else 0.0)
    return out[0], out[1]


def _start_server(rewards: list[str], port: int, max_batch: int, max_wait_ms: float, key: str) -> subprocess.Popen:
    env = {**os.environ, "FLOWGRPO_REWARD_API_KEY": key}
    cmd = [sys.executable, "-m", "flowgrpo.rewards.server", "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--log-level", "warning"]
    for r in rewards:
        cmd += ["--reward", r]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run(args: Any) -> dict[str, Any]:
    """Benchmark; ``args`` attributes (all optional): rewards ("jpeg_compressibility,ocr"), batch_sizes ("1,8,32"),
    clients (4), resolution (512), min_seconds (2.0), max_wait_ms (2.0)."""
    from flowgrpo.rewards import build_reward
    from flowgrpo.rewards.remote import RemoteReward, encode_image

    wanted = _names(_arg(args, "rewards", ",".join(DEFAULT_REWARDS)))
    batch_sizes = _ints(_arg(args, "batch_sizes", "1,8,32"))
    clients = int(_arg(args, "clients", 4))
    resolution = int(_arg(args, "resolution", 512))
    min_seconds = float(_arg(args, "min_seconds", 2.0))
    max_wait_ms = float(_arg(args, "max_wait_ms", 2.0))

    local: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in wanted:
        try:
            local[name] = build_reward(name)
        except Exception as e:  # noqa: BLE001  (e.g. OCR engine not installed)
            skipped[name] = f"{type(e).__name__}: {e}"
    if not local:
        raise RuntimeError(f"no reward could be built in-process: {skipped}")

    key = os.urandom(16).hex()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_server(list(local), port, max(batch_sizes), max_wait_ms, key)
    results: list[dict[str, Any]] = []
    try:
        t_load = time.perf_counter()
        probe = RemoteReward(next(iter(local)), url, api_key=key)
        try:
            probe.wait_ready(600, poll_s=0.1)
        except Exception:
            proc.kill()
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise RuntimeError(f"reward server did not become ready: {err}") from None
        server_ready_s = time.perf_counter() - t_load
        probe.close()
        for name, reward in local.items():
            for b in batch_sizes:
                ims, prompts = bench_images(b * clients, resolution, seed=b)
                meta = [{} for _ in prompts]
                parts = [(ims[i * b:(i + 1) * b], prompts[i * b:(i + 1) * b], meta[i * b:(i + 1) * b])
                         for i in range(clients)]
                remotes = [RemoteReward(name, url, api_key=key, chunk_size=max(b, 1), timeout_s=600)
                           for _ in range(clients)]
                # warm-up (first OCR call is slow; opens the connections) and exactness check
                expected = reward(*parts[0])
                got = remotes[0](*parts[0])
                match = bool(np.array_equal(expected.scores, got.scores))
                for r, p in zip(remotes[1:], parts[1:]):
                    r(*p)

                n1, s1 = _repeat(lambda: reward(*parts[0]), min_seconds)
                nn, sn = _concurrent([lambda p=p: reward(*p) for p in parts], min_seconds)
                t0 = time.perf_counter()
                for im in ims[:b]:
                    encode_image(im, "png")
                encode_s = (time.perf_counter() - t0) / b
                r1, rs1 = _repeat(lambda: remotes[0](*parts[0]), min_seconds)
                sum0, cnt0 = _metric_sums(url, name)
                rn, rsn = _concurrent([lambda r=r, p=p: r(*p) for r, p in zip(remotes, parts)], min_seconds)
                sum1, cnt1 = _metric_sums(url, name)
                for r in remotes:
                    r.close()
                inproc_ms = 1000 * s1 / (n1 * b)
                remote_ms = 1000 * rs1 / (r1 * b)
                results.append({
                    "reward": name, "batch": b, "clients": clients,
                    "inproc_1_images_per_s": round(n1 * b / s1, 2),
                    f"inproc_{clients}_images_per_s": round(nn * b / sn, 2),
                    "remote_1_images_per_s": round(r1 * b / rs1, 2),
                    f"remote_{clients}_images_per_s": round(rn * b / rsn, 2),
                    "inproc_ms_per_image": round(inproc_ms, 3),
                    "remote_1_ms_per_image": round(remote_ms, 3),
                    "server_overhead_ms_per_image": round(remote_ms - inproc_ms, 3),
                    "client_png_encode_ms_per_image": round(1000 * encode_s, 3),
                    f"remote_vs_inproc_throughput_{clients}_clients": round((rn * b / rsn) / (nn * b / sn), 3),
                    "server_mean_model_batch": round((sum1 - sum0) / (cnt1 - cnt0), 2) if cnt1 > cnt0 else None,
                    "scores_match_exactly": match,
                })
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()
    return {
        "bench": "reward-server", "resolution": resolution, "batch_sizes": batch_sizes, "clients": clients,
        "transport": "multipart PNG (lossless)", "min_seconds": min_seconds, "server_max_batch": max(batch_sizes),
        "server_max_wait_ms": max_wait_ms, "server_ready_s": round(server_ready_s, 2),
        "cpu_count": os.cpu_count(), "skipped": skipped, "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="flowgrpo bench reward-server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rewards", default=",".join(DEFAULT_REWARDS))
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    print(json.dumps(run(p.parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
