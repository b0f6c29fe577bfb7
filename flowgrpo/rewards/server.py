"""Reward server: any registered reward behind HTTP, with dynamic batching across concurrent requests.

    flowgrpo serve-reward --reward ocr --reward jpeg_compressibility --port 8000 [--api-key-file F | env
        FLOWGRPO_REWARD_API_KEY | --insecure-no-auth] [--max-batch 32] [--max-wait-ms 5] ...

Endpoints
---------
``POST /v1/score`` (``Authorization: Bearer <key>``)
    JSON body::

        {"reward": "ocr",                       # a reward this server serves
         "images": ["<base64 PNG or JPEG>", ...],  # N images, all the same size, RGB (other modes converted)
         "prompts": ["...", ...],              # optional, N strings (default "")
         "metadata": [{...}, ...]}             # optional, N dicts (default {})

    or ``multipart/form-data``: one JSON part named ``request`` (``{"reward", "prompts", "metadata"}``, no
    images) and the N images as file parts named ``images`` (raw PNG/JPEG bytes, in order). Multipart avoids
    base64 (one third smaller); the Python client (:mod:`flowgrpo.rewards.remote`) uses it by default. Only
    PNG and JPEG are decoded (never pickle or any other format); send PNG when scores must match in-process
    scores exactly (JPEG is lossy).

    Response 200::

        {"reward": "ocr", "scores": [float, ...], "details": [{...}, ...] or [],
         "n": N, "server": {"version": "...", "batch_sizes": [model batch sizes this request took part in]}}

    Scores are written with Python's ``json`` (exact float round-trip; NaN/Infinity as ``NaN``/``Infinity``).
    Errors are ``{"error": "<message>", ...}`` with status 400 (malformed body / image: names the index),
    401 (missing or wrong key), 404 (unknown reward: lists those served), 413 (body, image or batch too
    large: says the limit), 429 (queue full; ``Retry-After``), 500 (the reward raised), 503 (the reward is
    still loading or failed to load; ``Retry-After``).

``GET /healthz``  200 while the process serves HTTP (liveness; no auth).
``GET /readyz``   200 once every reward is loaded, else 503 with the state of each (readiness; no auth).
``GET /metrics``  Prometheus text format (no auth): requests by reward and status, request latency,
                  images, model batch sizes, inference time, queue depth, errors by kind, readiness.

Rewards are built with :func:`flowgrpo.rewards.build_reward` in a background thread at startup, so the port
answers (``/healthz``, ``/readyz`` = 503) while models load. Each reward has one worker thread that runs the
model: requests are split into pieces of at most ``max_batch`` images and queued; the worker concatenates
queued pieces of the same image size up to ``max_batch`` images, runs the reward once and hands each request
its slice. While the model runs, new requests queue up and form the next batch; before starting a batch the
worker waits for more only while other requests for that reward are still being decoded, and at most
``max_wait_ms`` after the first (so a lone client pays no batching delay). If a combined batch raises, its pieces are
re-run one by one so one bad request cannot fail its neighbours.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import hmac
import io
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image

import flowgrpo
import flowgrpo.rewards  # noqa: F401  (runs the registrations)
from flowgrpo.rewards.base import KNOWN_REWARDS, REFERENCE_KEY, REFERENCE_REWARDS, REGISTRY, RewardOutput, build_reward

log = logging.getLogger("flowgrpo.reward_server")

API_KEY_ENV = "FLOWGRPO_REWARD_API_KEY"
SCORE_PATH = "/v1/score"
_ALLOWED_FORMATS = ("PNG", "JPEG")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers, self.extra = status, message, kind, headers or {}, extra


# ---------------------------------------------------------------------------------------------- metrics
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1


def _labels(d: dict[str, str]) -> str:
    def esc(v: str) -> str:
        return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in d.items()) + "}" if d else ""


class Metrics:
    """A few Prometheus series, rendered by hand (text format 0.0.4); thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (reward, code) -> n
        self.errors: collections.Counter = collections.Counter()  # (reward, kind) -> n
        self.images: collections.Counter = collections.Counter()  # reward -> n
        self.latency: dict[str, _Histogram] = {}
        self.request_images: dict[str, _Histogram] = {}
        self.batch: dict[str, _Histogram] = {}
        self.inference: dict[str, _Histogram] = {}
        self.queue_depth: dict[str, int] = {}
        self.ready: dict[str, int] = {}
        self.started = time.time()

    def request(self, reward: str, code: int, seconds: float, n_images: int, error_kind: str | None) -> None:
        with self.lock:
            self.requests[(reward, str(code))] += 1
            self.latency.setdefault(reward, _Histogram(_LATENCY_BUCKETS)).observe(seconds)
            if error_kind:
                self.errors[(reward, error_kind)] += 1
            elif n_images:
                self.images[reward] += n_images
                self.request_images.setdefault(reward, _Histogram(_BATCH_BUCKETS)).observe(n_images)

    def batch_run(self, reward: str, size: int, seconds: float) -> None:
        with self.lock:
            self.batch.setdefault(reward, _Histogram(_BATCH_BUCKETS)).observe(size)
            self.inference.setdefault(reward, _Histogram(_LATENCY_BUCKETS)).observe(seconds)

    def render(self) -> str:
        out: list[str] = []

        def header(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        def hist(name: str, help_: str, series: dict[str, _Histogram]) -> None:
            header(name, "histogram", help_)
            for reward, h in sorted(series.items()):
                for b, c in zip(h.buckets, h.counts):
                    out.append(f"{name}_bucket{_labels({'reward': reward, 'le': f'{b:g}'})} {c}")
                out.append(f"{name}_bucket{_labels({'reward': reward, 'le': '+Inf'})} {h.count}")
                out.append(f"{name}_sum{_labels({'reward': reward})} {h.sum:.6f}")
                out.append(f"{name}_count{_labels({'reward': reward})} {h.count}")

        with self.lock:
            header("flowgrpo_reward_requests_total", "counter", "Score requests by reward and HTTP status.")
            for (reward, code), n in sorted(self.requests.items()):
                out.append(f"flowgrpo_reward_requests_total{_labels({'reward': reward, 'code': code})} {n}")
            header("flowgrpo_reward_errors_total", "counter", "Failed score requests by reward and error kind.")
            for (reward, kind), n in sorted(self.errors.items()):
                out.append(f"flowgrpo_reward_errors_total{_labels({'reward': reward, 'kind': kind})} {n}")
            header("flowgrpo_reward_images_total", "counter", "Images scored.")
            for reward, n in sorted(self.images.items()):
                out.append(f"flowgrpo_reward_images_total{_labels({'reward': reward})} {n}")
            hist("flowgrpo_reward_request_latency_seconds", "Score request latency (receive to response).",
                 self.latency)
            hist("flowgrpo_reward_request_images", "Images per successful score request.", self.request_images)
            hist("flowgrpo_reward_batch_size", "Images per model call after dynamic batching.", self.batch)
            hist("flowgrpo_reward_inference_seconds", "Wall time of one model call.", self.inference)
            header("flowgrpo_reward_queue_depth", "gauge", "Images waiting for the model.")
            for reward, n in sorted(self.queue_depth.items()):
                out.append(f"flowgrpo_reward_queue_depth{_labels({'reward': reward})} {n}")
            header("flowgrpo_reward_ready", "gauge", "1 when the reward's model is loaded.")
            for reward, n in sorted(self.ready.items()):
                out.append(f"flowgrpo_reward_ready{_labels({'reward': reward})} {n}")
            header("flowgrpo_reward_uptime_seconds", "gauge", "Seconds since the server started.")
            out.append(f"flowgrpo_reward_uptime_seconds {time.time() - self.started:.3f}")
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- batching
@dataclass(eq=False)  # identity equality: deque.remove must not compare arrays
class _Piece:
    images: np.ndarray  # [n, H, W, 3] uint8
    prompts: list[str]
    metadata: list[dict]
    future: concurrent.futures.Future
    batch_sizes: list[int] = field(default_factory=list)


class Batcher:
    """One worker thread per reward: concatenates queued pieces (same image size) up to ``max_batch`` images,
    waiting at most ``max_wait_s`` after the first, and runs the reward once per batch."""

    def __init__(self, name: str, max_batch: int, max_wait_s: float, max_queue_images: int, metrics: Metrics):
        self.name, self.max_batch, self.max_wait_s = name, max_batch, max_wait_s
        self.max_queue_images = max_queue_images
        self.metrics = metrics
        self.reward: Any = None
        self.state = "loading"  # loading | ready | failed
        self.error = ""
        self.cond = threading.Condition()
        self.queue: collections.deque[_Piece] = collections.deque()
        self.queued_images = 0
        self.incoming = 0  # requests for this reward being decoded (about to be queued)
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name=f"reward-{name}", daemon=True)
        metrics.queue_depth[name] = 0
        metrics.ready[name] = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=5)

    def arriving(self, delta: int) -> None:
        """+1 when a request for this reward starts decoding, -1 if it fails before :meth:`submit`."""
        with self.cond:
            self.incoming += delta
            self.cond.notify_all()

    def submit(self, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> list[_Piece]:
        """Queue a decoded request (ends its :meth:`arriving`) -> its pieces, each with a future."""
        n = len(images)
        with self.cond:
            self.incoming -= 1
            if self.queued_images + n > self.max_queue_images and self.queued_images > 0:
                raise HTTPError(429, f"reward {self.name!r}: queue full ({self.queued_images} images waiting, "
                                     f"limit {self.max_queue_images}); retry later", "queue_full",
                                {"Retry-After": "1"})
            pieces = []
            for s in range(0, n, self.max_batch):
                p = _Piece(images[s:s + self.max_batch], prompts[s:s + self.max_batch],
                           metadata[s:s + self.max_batch], concurrent.futures.Future())
                pieces.append(p)
                self.queue.append(p)
            self.queued_images += n
            self.metrics.queue_depth[self.name] = self.queued_images
            self.cond.notify_all()
        return pieces

    def _take_batch(self) -> list[_Piece] | None:
        with self.cond:
            while not self.queue and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return None
            first = self.queue.popleft()
            batch, n = [first], len(first.images)
            shape = first.images.shape[1:]
            deadline = time.monotonic() + self.max_wait_s
            while n < self.max_batch:
                # take every queued piece of the same size that fits, in order; others stay queued
                taken = False
                for p in list(self.queue):
                    if p.images.shape[1:] == shape and n + len(p.images) <= self.max_batch:
                        self.queue.remove(p)
                        batch.append(p)
                        n += len(p.images)
                        taken = True
                if n >= self.max_batch:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.stopping or self.incoming <= 0:
                    break  # wait only while more requests are on their way in
                if not taken:
                    self.cond.wait(remaining)
            self.queued_images -= n
            self.metrics.queue_depth[self.name] = self.queued_images
            return batch

    def _run(self, pieces: list[_Piece]) -> RewardOutput:
        images = pieces[0].images if len(pieces) == 1 else np.concatenate([p.images for p in pieces])
        prompts = [s for p in pieces for s in p.prompts]
        metadata = [m for p in pieces for m in p.metadata]
        t0 = time.perf_counter()
        out = self.reward(images, prompts, metadata)
        self.metrics.batch_run(self.name, len(images), time.perf_counter() - t0)
        scores = np.asarray(out.scores, dtype=np.float64).reshape(-1)
        if scores.shape != (len(images),):
            raise RuntimeError(f"reward {self.name!r} returned {scores.shape[0]} scores for {len(images)} images")
        details = list(out.details or [])
        if details and len(details) != len(images):
            raise RuntimeError(f"reward {self.name!r} returned {len(details)} details for {len(images)} images")
        return RewardOutput(scores, details)

    def _loop(self) -> None:
        try:
            while True:
                batch = self._take_batch()
                if batch is None:
                    return
                self._process(batch)
        except BaseException as e:  # never leave requests hanging on a dead worker
            self.state, self.error = "failed", f"worker crashed: {type(e).__name__}: {e}"
            log.exception("reward %s worker crashed", self.name)
            with self.cond:
                pending, self.queue = list(self.queue), collections.deque()
                self.queued_images = 0
            for p in pending:
                if not p.future.done():
                    p.future.set_exception(RuntimeError(self.error))
            raise

    def _process(self, batch: list[_Piece]) -> None:
        try:
            out = self._run(batch)
        except Exception as e:  # noqa: BLE001
            if len(batch) == 1:
                batch[0].future.set_exception(e)
                return
            for p in batch:  # isolate the failing request(s)
                try:
                    o = self._run([p])
                    p.batch_sizes.append(len(p.images))
                    p.future.set_result(o)
                except Exception as e1:  # noqa: BLE001
                    p.future.set_exception(e1)
            return
        s, size = 0, len(out.scores)
        for p in batch:
            k = len(p.images)
            p.batch_sizes.append(size)
            p.future.set_result(RewardOutput(out.scores[s:s + k], out.details[s:s + k] if out.details else []))
            s += k


# ---------------------------------------------------------------------------------------------- decoding
def decode_image(data: bytes, index: int, max_pixels: int) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 [H, W, 3]; HTTPError 400 (naming ``index``) for anything else."""
    try:
        with Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise HTTPError(413, f"image {index}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}",
                                "too_large", index=index)
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except HTTPError:
        raise
    except Exception as e:  # noqa: BLE001  (PIL raises many types for corrupt data)
        raise HTTPError(400, f"image {index}: not a decodable PNG/JPEG image ({type(e).__name__}: {e})",
                        "bad_image", index=index) from None


def decode_images(items: Sequence[bytes | str], max_pixels: int) -> np.ndarray:
    """PNG/JPEG bytes (or base64 strings of them) -> uint8 [N, H, W, 3]; HTTPError 400 naming the bad index."""
    arrays = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            try:
                item = base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError) as e:
                raise HTTPError(400, f"image {i}: invalid base64 ({e})", "bad_image", index=i) from None
        arrays.append(decode_image(item, i, max_pixels))
    for i, a in enumerate(arrays[1:], start=1):
        if a.shape != arrays[0].shape:
            raise HTTPError(400, f"image {i}: size {a.shape[1]}x{a.shape[0]} differs from image 0 "
                                 f"({arrays[0].shape[1]}x{arrays[0].shape[0]}); one request must hold images of "
                                 "one size", "bad_image", index=i)
    return np.stack(arrays)


_DATA_URI_PREFIX = "data:image/"


def decode_references(metadata: Sequence[dict], max_pixels: int) -> list[dict]:
    """For rewards that read a reference image (``REFERENCE_REWARDS``): every row's ``metadata[REFERENCE_KEY]`` must
    be an inline ``data:image/...;base64,...`` PNG/JPEG and becomes uint8 [H, W, 3] (each distinct one decoded
    once). A path or URL is refused with 400: the server never opens a file or a URL that a request names."""
    decoded: dict[str, np.ndarray] = {}
    out = []
    for i, md in enumerate(metadata):
        ref = md.get(REFERENCE_KEY)
        where = f"metadata[{i}].{REFERENCE_KEY}"
        if not isinstance(ref, str) or not ref.startswith(_DATA_URI_PREFIX) or ";base64," not in ref:
            got = f"{ref!r:.80}" if isinstance(ref, str) else type(ref).__name__
            raise HTTPError(400, f"{where}: the reference image must be inline, a data:image/png;base64,... URI; got "
                                 f"{got} (the server opens no paths; flowgrpo's client inlines local files)",
                            "bad_reference", index=i)
        if ref not in decoded:
            try:
                raw = base64.b64decode(ref.split(";base64,", 1)[1], validate=True)
            except (binascii.Error, ValueError) as e:
                raise HTTPError(400, f"{where}: invalid base64 ({e})", "bad_reference", index=i) from None
            try:
                decoded[ref] = decode_image(raw, i, max_pixels)
            except HTTPError as e:
                raise HTTPError(e.status, f"{where} (reference): {e.message}", "bad_reference", index=i) from None
        out.append({**md, REFERENCE_KEY: decoded[ref]})
    return out


def _json_dumps(obj: Any) -> bytes:
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    return json.dumps(obj, default=default, allow_nan=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------- app
def create_app(reward_names: list[str], api_key: str | None, max_batch: int = 32, max_wait_ms: float = 5.0,
               max_request_bytes: int = 128 * 1024 * 1024, max_images_per_request: int = 256,
               reward_options: dict[str, dict[str, Any]] | None = None, *, insecure_no_auth: bool = False,
               max_queue_images: int = 4096, max_image_pixels: int = 4096 * 4096):
    """The Starlette app serving ``reward_names``. ``api_key=None`` requires ``insecure_no_auth=True``.

    Models are built in a background thread when the app starts (lifespan), so ``/readyz`` answers 503 until
    they are loaded. ``app.state.batchers`` maps name -> :class:`Batcher` (its ``state``: loading|ready|failed).
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    if not reward_names:
        raise ValueError("serve at least one reward (--reward NAME)")
    if api_key is None and not insecure_no_auth:
        raise ValueError(f"no API key: set {API_KEY_ENV}, pass --api-key-file, or --insecure-no-auth for local use")
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty")
    options = {k: dict(v or {}) for k, v in (reward_options or {}).items()}
    names = list(dict.fromkeys(reward_names))
    for name in names:
        if name not in REGISTRY and "url" not in options.get(name, {}):
            raise ValueError(f"cannot serve reward {name!r}: not available in this build "
                             f"(available: {sorted(REGISTRY)}; known: {sorted(KNOWN_REWARDS)})")
    if max_batch < 1 or max_images_per_request < 1 or max_request_bytes < 1:
        raise ValueError("max_batch, max_images_per_request and max_request_bytes must be >= 1")

    metrics = Metrics()
    batchers = {n: Batcher(n, max_batch, max_wait_ms / 1000.0, max(max_queue_images, max_batch), metrics)
                for n in names}
    key_bytes = api_key.encode() if api_key is not None else None
    decode_pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                                        thread_name_prefix="decode")

    def load_all() -> None:
        for name, b in batchers.items():
            t0 = time.perf_counter()
            try:
                b.reward = build_reward(name, **options.get(name, {}))
                b.state = "ready"
                metrics.ready[name] = 1
                log.info("reward %s loaded in %.1fs", name, time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001
                b.state, b.error = "failed", f"{type(e).__name__}: {e}"
                log.error("reward %s failed to load: %s", name, b.error)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for b in batchers.values():
            b.start()
        loader = threading.Thread(target=load_all, name="reward-loader", daemon=True)
        loader.start()
        app.state.loader = loader
        try:
            yield
        finally:
            for b in batchers.values():
                b.stop()
            decode_pool.shutdown(wait=False, cancel_futures=True)

    def error_response(e: HTTPError) -> Response:
        body = {"error": e.message, **e.extra}
        return Response(_json_dumps(body), status_code=e.status, media_type="application/json", headers=e.headers)

    def check_auth(request: Request) -> None:
        if key_bytes is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPError(401, "missing API key: send 'Authorization: Bearer <key>' (client: set "
                                 f"{API_KEY_ENV})", "auth", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), key_bytes):
            raise HTTPError(401, "invalid API key", "auth", {"WWW-Authenticate": "Bearer"})

    def too_large(n: int | None = None) -> HTTPError:
        size = f"request body of {n} bytes" if n is not None else "request body"
        return HTTPError(413, f"{size} exceeds the limit of {max_request_bytes} bytes; send fewer images per "
                              "request (client: chunk_size)", "too_large", {"Connection": "close"})

    def check_length(request: Request) -> None:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise HTTPError(400, f"bad Content-Length {length!r}", "bad_request") from None
            if n > max_request_bytes:
                raise too_large(n)

    async def read_body(request: Request) -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_request_bytes:
                raise too_large()
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse(request: Request) -> tuple[dict, list[bytes | str]]:
        """-> (the request object without images, the images as raw bytes or base64 strings)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            total = 0

            async def receive() -> dict:  # stream into the parser, counting bytes (no extra copy of the body)
                nonlocal total
                message = await request.receive()
                total += len(message.get("body", b""))
                if total > max_request_bytes:
                    raise too_large()
                return message

            replay = Request(request.scope, receive)
            try:
                form = await replay.form(max_files=max_images_per_request + 1, max_fields=16,
                                         max_part_size=max_request_bytes)
            except HTTPError:
                raise
            except Exception as e:  # noqa: BLE001
                detail = str(getattr(e, "detail", e))
                if "too many files" in detail.lower():
                    raise HTTPError(413, f"more than {max_images_per_request} images in one request exceeds the "
                                         f"limit of {max_images_per_request}; send fewer per request (client: "
                                         "chunk_size)", "too_large") from None
                raise HTTPError(400, f"malformed multipart body: {detail}", "bad_request") from None
            try:
                meta_part = form.get("request")
                if meta_part is None:
                    raise HTTPError(400, "multipart body needs a JSON part named 'request' "
                                         "({\"reward\": ..., \"prompts\": ..., \"metadata\": ...})", "bad_request")
                raw = await meta_part.read() if hasattr(meta_part, "read") else meta_part
                try:
                    payload = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as e:
                    raise HTTPError(400, f"part 'request' is not valid JSON: {e}", "bad_request") from None
                if not isinstance(payload, dict):
                    raise HTTPError(400, "part 'request' must be a JSON object", "bad_request")
                files = form.getlist("images")
                blobs = []
                for i, f in enumerate(files):
                    if not hasattr(f, "read"):
                        raise HTTPError(400, f"image {i}: part 'images' must be a file part", "bad_image", index=i)
                    blobs.append(await f.read())
                return payload, blobs
            finally:
                await form.close()
        body = await read_body(request)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"body is not valid JSON ({e}); send application/json or multipart/form-data",
                            "bad_request") from None
        if not isinstance(payload, dict):
            raise HTTPError(400, "the JSON body must be an object {\"reward\", \"images\", ...}", "bad_request")
        images = payload.pop("images", None)
        if not isinstance(images, list):
            raise HTTPError(400, "'images' must be a list of base64-encoded PNG/JPEG strings", "bad_request")
        for i, s in enumerate(images):
            if not isinstance(s, str):
                raise HTTPError(400, f"image {i}: expected a base64 string, got {type(s).__name__}", "bad_image",
                                index=i)
        return payload, images  # base64-decoded with the images, after the limits are checked

    async def score(request: Request) -> Response:
        t0 = time.perf_counter()
        label, n_images, kind, status = "_unknown", 0, None, 200
        try:
            check_auth(request)
            check_length(request)
            payload, blobs = await parse(request)
            name = payload.get("reward")
            if not isinstance(name, str):
                raise HTTPError(400, "'reward' must be a reward name string", "bad_request")
            if name not in batchers:
                raise HTTPError(404, f"reward {name!r} is not served here; served: {sorted(batchers)}",
                                "unknown_reward", served=sorted(batchers), known=sorted(KNOWN_REWARDS))
            label = name
            b = batchers[name]
            n = len(blobs)
            if n == 0:
                raise HTTPError(400, "no images in the request", "bad_request")
            if n > max_images_per_request:
                raise HTTPError(413, f"{n} images in one request exceeds the limit of {max_images_per_request}; "
                                     "send fewer per request (client: chunk_size)", "too_large")
            prompts = payload.get("prompts")
            prompts = [""] * n if prompts is None else prompts
            if not isinstance(prompts, list) or len(prompts) != n or not all(isinstance(p, str) for p in prompts):
                raise HTTPError(400, f"'prompts' must be a list of {n} strings (one per image)", "bad_request")
            metadata = payload.get("metadata")
            metadata = [{} for _ in range(n)] if metadata is None else metadata
            if not isinstance(metadata, list) or len(metadata) != n or not all(isinstance(m, dict) for m in metadata):
                raise HTTPError(400, f"'metadata' must be a list of {n} objects (one per image)", "bad_request")
            if b.state != "ready":
                msg = (f"reward {name!r} is still loading" if b.state == "loading"
                       else f"reward {name!r} failed to load: {b.error}")
                raise HTTPError(503, msg, "not_ready", {"Retry-After": "1"})
            loop = asyncio.get_running_loop()
            b.arriving(+1)
            try:
                images = await loop.run_in_executor(decode_pool, decode_images, blobs, max_image_pixels)
            except BaseException:
                b.arriving(-1)
                raise
            del blobs
            if name in REFERENCE_REWARDS:
                try:
                    metadata = await loop.run_in_executor(decode_pool, decode_references, metadata, max_image_pixels)
                except BaseException:
                    b.arriving(-1)
                    raise
            pieces = b.submit(images, prompts, metadata)
            try:
                outs = [await asyncio.wrap_future(p.future) for p in pieces]
            except Exception as e:  # noqa: BLE001
                log.exception("reward %s failed", name)
                raise HTTPError(500, f"reward {name!r} failed: {type(e).__name__}: {e}", "reward_error") from None
            scores = np.concatenate([o.scores for o in outs])
            details = [d for o in outs for d in o.details] if all(o.details for o in outs) else []
            n_images = n
            body_out = {"reward": name, "scores": scores.tolist(), "details": details, "n": n,
                        "server": {"version": flowgrpo.__version__,
                                   "batch_sizes": [s for p in pieces for s in p.batch_sizes]}}
            return Response(_json_dumps(body_out), media_type="application/json")
        except HTTPError as e:
            status, kind = e.status, e.kind
            return error_response(e)
        except Exception as e:  # noqa: BLE001
            log.exception("internal error")
            status, kind = 500, "internal"
            return error_response(HTTPError(500, f"internal error: {type(e).__name__}: {e}", "internal"))
        finally:
            metrics.request(label, status, time.perf_counter() - t0, n_images, kind)

    async def healthz(request: Request) -> Response:
        dead = sorted(n for n, b in batchers.items() if b.thread.ident is not None and not b.thread.is_alive()
                      and not b.stopping)
        if dead:  # a crashed worker cannot recover: fail liveness so the orchestrator restarts us
            return Response(_json_dumps({"status": "worker thread dead", "rewards": dead}), status_code=500,
                            media_type="application/json")
        return Response(_json_dumps({"status": "ok", "version": flowgrpo.__version__}), media_type="application/json")

    async def readyz(request: Request) -> Response:
        states = {n: (b.state if b.state != "failed" else f"failed: {b.error}") for n, b in batchers.items()}
        ready = all(b.state == "ready" for b in batchers.values())
        return Response(_json_dumps({"ready": ready, "rewards": states}), status_code=200 if ready else 503,
                        media_type="application/json")

    async def metrics_ep(request: Request) -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app = Starlette(routes=[Route(SCORE_PATH, score, methods=["POST"]), Route("/healthz", healthz),
                            Route("/readyz", readyz), Route("/metrics", metrics_ep)], lifespan=lifespan)
    app.state.batchers = batchers
    app.state.metrics = metrics
    return app


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``flowgrpo serve-reward`` arguments."""
    p.add_argument("--reward", action="append", required=True, metavar="NAME",
                   help="reward to serve (repeatable), any registered name")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", default=None,
                   help=f"file holding the bearer API key (default: the {API_KEY_ENV} environment variable)")
    p.add_argument("--insecure-no-auth", action="store_true", help="serve without an API key (local use only)")
    p.add_argument("--max-batch", type=int, default=32, help="max images per model call (dynamic batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="max wait for more requests to fill a batch")
    p.add_argument("--max-request-mb", type=float, default=128.0, help="max request body size (MiB)")
    p.add_argument("--max-images-per-request", type=int, default=256)
    p.add_argument("--max-queue-images", type=int, default=4096, help="images queued per reward before 429")
    p.add_argument("--reward-options", default=None,
                   help="JSON object or path to a JSON/YAML file: {reward_name: {option: value}}")
    p.add_argument("--log-level", default="info")
    return p


def resolve_api_key(api_key_file: str | None, insecure_no_auth: bool) -> str | None:
    if api_key_file:
        with open(api_key_file, encoding="utf-8") as f:
            key = f.read().strip()
        if not key:
            raise ValueError(f"API key file {api_key_file} is empty")
        return key
    key = os.environ.get(API_KEY_ENV, "").strip()
    if key:
        return key
    if insecure_no_auth:
        return None
    raise ValueError(f"no API key: set {API_KEY_ENV} or pass --api-key-file (or --insecure-no-auth for local use)")


def _load_options(spec: str | None) -> dict[str, dict[str, Any]] | None:
    if not spec:
        return None
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            text = f.read()
        if spec.endswith((".yaml", ".yml")):
            import yaml

            return yaml.safe_load(text) or {}
        return json.loads(text)
    return json.loads(spec)


def serve(args: argparse.Namespace) -> int:
    """``flowgrpo serve-reward``: ``args`` as :func:`add_arguments` defines them (missing ones take its defaults)."""
    import uvicorn

    defaults = vars(add_arguments(argparse.ArgumentParser()).parse_args(["--reward", "_"]))
    a = argparse.Namespace(**{**defaults, **{k: v for k, v in vars(args).items() if v is not None}})
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        key = resolve_api_key(a.api_key_file, a.insecure_no_auth)
        if key is None:
            log.warning("serving WITHOUT authentication (--insecure-no-auth)")
        app = create_app(a.reward, key, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms,
                         max_request_bytes=int(a.max_request_mb * 1024 * 1024),
                         max_images_per_request=a.max_images_per_request,
                         reward_options=_load_options(a.reward_options), insecure_no_auth=key is None,
                         max_queue_images=a.max_queue_images)
    except (ValueError, OSError) as e:
        print(f"flowgrpo serve-reward: {e}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level.lower(), timeout_keep_alive=30)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="flowgrpo serve-reward", description=__doc__,
                                              formatter_class=argparse.RawDescriptionHelpFormatter))
    return serve(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
