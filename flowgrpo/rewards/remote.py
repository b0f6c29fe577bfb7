"""HTTP client reward: scores a batch on a reward server (``flowgrpo serve-reward``, :mod:`flowgrpo.rewards.server`).

``build_reward(name, url=..., **options)`` returns ``RemoteReward(name, url=..., **options)``, so a config selects it
with ``reward_options: {deqa: {url: "http://reward-server:8000"}}``. Any reward name works (the server decides what
it serves); ``deqa`` exists only this way.

* Images go as lossless PNG (``image_format="png"``, default) in a multipart body (``transport="json"``: base64 in
  JSON), so remote scores equal in-process scores; ``"jpeg"`` is smaller but lossy. PNGs are written uncompressed
  by default (``png_compress_level=0``: ~1 ms per 512x512 image, about the raw size, where zlib costs 15-40 ms per
  image on a CPU core); set 1-9 for slow links.
* A batch is split into ``chunk_size`` requests, sent ``max_parallel_chunks`` at a time (the server batches them
  again across clients); a 413 for a multi-image chunk halves it and retries.
* Each request waits at most ``timeout_s`` (connect: ``connect_timeout_s``). Connection errors, timeouts, 408, 429
  and 5xx are retried with exponential backoff and jitter (``backoff_base_s * 2**k``, capped by ``backoff_max_s``,
  scaled by a random factor in [0.5, 1]; a server's ``Retry-After`` is honoured), at most ``max_retries`` times per
  request and never after ``retry_budget_s`` seconds since the call began. Then, or at once for other statuses
  (400, 401, 404, ...), :class:`RewardServerError` names the URL, the reward and the last status or exception.
* Reference images (``image_similarity``'s ``metadata["image"]``, an edit's source) given as local paths are sent
  inline as ``data:`` URIs (:func:`portable_metadata`): the server may run in another pod and never opens paths.
* Thread-safe: the recipe calls rewards from a thread pool; every thread gets its own pooled ``requests.Session``.
* The API key (``api_key``, else ``api_key_file``, else the ``api_key_env`` environment variable) is sent as
  ``Authorization: Bearer``; it is never logged or shown in ``repr``.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import logging
import os
import random
import struct
import threading
import time
import zlib
from typing import Any, Sequence

import numpy as np

from flowgrpo.rewards.base import REFERENCE_KEY, REFERENCE_REWARDS, RewardOutput, as_uint8

log = logging.getLogger("flowgrpo.rewards.remote")

API_KEY_ENV = "FLOWGRPO_REWARD_API_KEY"
SCORE_PATH = "/v1/score"
_RETRY_STATUSES = frozenset({408, 429})


class RewardServerError(RuntimeError):
    """The reward server could not score a batch. ``url``, ``status`` (last HTTP status or None), ``attempts`` and
    ``last_error`` (the last status line/message or exception) are attributes; the message names all of them."""

    def __init__(self, message: str, *, url: str, status: int | None = None, attempts: int = 0,
                 last_error: str | None = None):
        super().__init__(message)
        self.url, self.status, self.attempts, self.last_error = url, status, attempts, last_error


class _SplitChunk(Exception):
    """413 for a multi-image chunk: the caller halves it."""


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def encode_png_stored(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> a valid, lossless PNG with no filtering and a stored (level 0) zlib stream: ~1 ms for
    512x512 where PIL's PNG encoder takes 15-40 ms. About the raw size (H*(3W+1) bytes): cheap on a cluster
    network; use ``png_compress_level`` >= 1 for smaller, slower PNGs."""
    h, w, c = image.shape
    if c != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    raw = np.zeros((h, 3 * w + 1), dtype=np.uint8)  # filter byte 0 ("None") per row
    raw[:, 1:] = image.reshape(h, 3 * w)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 0)) + _png_chunk(b"IEND", b""))


def encode_image(image: np.ndarray, fmt: str = "png", jpeg_quality: int = 95, png_compress_level: int = 0) -> bytes:
    """uint8 [H, W, 3] -> PNG (lossless; level 0: :func:`encode_png_stored`, else PIL at that zlib level) or JPEG."""
    from PIL import Image

    image = np.ascontiguousarray(image)
    if fmt == "png" and png_compress_level == 0:
        return encode_png_stored(image)
    buf = io.BytesIO()
    im = Image.fromarray(image)
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=int(png_compress_level))
    elif fmt in ("jpeg", "jpg"):
        im.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {fmt!r}")
    return buf.getvalue()


def inline_image(path: str) -> str:
    """A local image file as a ``data:image/<type>;base64,...`` URI (the file's bytes, not re-encoded)."""
    import mimetypes

    mime = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"


def portable_metadata(reward: str, metadata: Sequence[dict]) -> list[dict]:
    """Metadata rows a server in another pod can use: for rewards that read a reference image
    (:data:`~flowgrpo.rewards.base.REFERENCE_REWARDS`) a local path under ``REFERENCE_KEY`` goes inline as a data URI
    (each file read once per call); for the others the path is dropped (they never read it, and the server would
    refuse it)."""
    inlined: dict[str, str] = {}
    out = []
    for i, md in enumerate(metadata):
        row = dict(md)
        ref = row.get(REFERENCE_KEY)
        if isinstance(ref, (str, os.PathLike)) and not str(ref).startswith("data:"):
            if reward not in REFERENCE_REWARDS:
                del row[REFERENCE_KEY]
            else:
                path = str(ref)
                if path not in inlined:
                    if not os.path.isfile(path):
                        raise FileNotFoundError(f"reward {reward!r}: metadata[{i}].{REFERENCE_KEY} = {path!r} is not a "
                                                "local file; the reference image is sent inline to the reward server")
                    inlined[path] = inline_image(path)
                row[REFERENCE_KEY] = inlined[path]
        out.append(row)
    return out


def _part(boundary: str, name: str, filename: str, ctype: str, data: bytes) -> tuple[bytes, bytes, bytes]:
    """One multipart/form-data file part (RFC 7578) as pieces; the body is one ``b"".join`` (no per-part copies)."""
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {ctype}\r\n\r\n").encode()
    return head, data, b"\r\n"


def _endpoint(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"reward server url must start with http:// or https://, got {url!r}")
    return url if url.endswith(SCORE_PATH) else url + SCORE_PATH


def _server_message(r: Any) -> str:
    try:
        body = r.json()
        if isinstance(body, dict) and "error" in body:
            return str(body["error"])
    except ValueError:
        pass
    text = (r.text or "").strip().replace("\n", " ")
    return text[:300] if text else "(empty body)"


def client_options(options: dict[str, Any]) -> dict[str, Any]:
    """The entries of a reward's options that configure the HTTP client (:class:`RemoteReward`'s keyword arguments,
    e.g. ``timeout_s``); the rest (``model``, ``device``, ...) configure the reward model on its server."""
    import inspect

    accepted = set(inspect.signature(RemoteReward.__init__).parameters) - {"self", "name"}
    return {k: v for k, v in options.items() if k in accepted}


class RemoteReward:
    """Reward ``name`` scored by the reward server at ``url`` (base URL or the full ``.../v1/score``)."""

    def __init__(self, name: str, url: str, api_key: str | None = None, api_key_env: str = API_KEY_ENV,
                 api_key_file: str | None = None, timeout_s: float = 120.0, connect_timeout_s: float = 10.0,
                 chunk_size: int = 32, max_retries: int = 8, retry_budget_s: float = 300.0,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 30.0, image_format: str = "png",
                 jpeg_quality: int = 95, png_compress_level: int = 0, transport: str = "multipart",
                 max_parallel_chunks: int = 4, pool_maxsize: int = 16):
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if transport not in ("multipart", "json"):
            raise ValueError(f"transport must be 'multipart' or 'json', got {transport!r}")
        if image_format not in ("png", "jpeg", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
        self.name = name
        self.url = _endpoint(url)
        self.base_url = self.url[: -len(SCORE_PATH)]
        if api_key is None and api_key_file:
            with open(api_key_file, encoding="utf-8") as f:
                api_key = f.read().strip() or None
        if api_key is None and api_key_env:
            api_key = os.environ.get(api_key_env, "").strip() or None
        self.__key = api_key
        self.timeout_s, self.connect_timeout_s = float(timeout_s), float(connect_timeout_s)
        self.chunk_size, self.max_retries = int(chunk_size), int(max_retries)
        self.retry_budget_s, self.backoff_base_s, self.backoff_max_s = float(retry_budget_s), float(backoff_base_s), \
            float(backoff_max_s)
        self.image_format, self.jpeg_quality, self.transport = image_format, int(jpeg_quality), transport
        self.png_compress_level = int(png_compress_level)
        self.max_parallel_chunks, self.pool_maxsize = max(1, int(max_parallel_chunks)), int(pool_maxsize)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: list[Any] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._rng = random.Random()
        self.stats = {"requests": 0, "retries": 0}

    def __repr__(self) -> str:
        return (f"RemoteReward({self.name!r}, url={self.url!r}, auth={'yes' if self.__key else 'no'}, "
                f"chunk_size={self.chunk_size})")

    # ---------------------------------------------------------------------------------------- plumbing
    def _session(self):
        s = getattr(self._local, "session", None)
        if s is None:
            import requests
            from requests.adapters import HTTPAdapter

            s = requests.Session()
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self.pool_maxsize, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.headers["User-Agent"] = "flowgrpo-reward-client"
            if self.__key:
                s.headers["Authorization"] = f"Bearer {self.__key}"
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
            ex, self._executor = self._executor, None
        for s in sessions:
            s.close()
        if ex is not None:
            ex.shutdown(wait=False)
        self._local = threading.local()

    def __enter__(self) -> "RemoteReward":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(self.max_parallel_chunks,
                                                                       thread_name_prefix=f"remote-{self.name}")
            return self._executor

    def _encode(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]) -> tuple[bytes, str]:
        fmt = "jpeg" if self.image_format in ("jpeg", "jpg") else "png"
        blobs = [encode_image(im, fmt, self.jpeg_quality, self.png_compress_level) for im in images]
        meta = {"reward": self.name, "prompts": list(prompts), "metadata": portable_metadata(self.name, metadata)}
        if self.transport == "json":
            meta["images"] = [base64.b64encode(b).decode("ascii") for b in blobs]
            return json.dumps(meta, default=str).encode(), "application/json"
        boundary = os.urandom(16).hex()
        parts = [*_part(boundary, "request", "request.json", "application/json",
                        json.dumps(meta, default=str).encode())]
        for i, b in enumerate(blobs):
            parts += _part(boundary, "images", f"{i}.{fmt}", f"image/{fmt}", b)
        parts.append(f"--{boundary}--\r\n".encode())
        return b"".join(parts), f"multipart/form-data; boundary={boundary}"

    def _fail(self, what: str, attempts: int, t0: float, last: str, status: int | None) -> RewardServerError:
        msg = (f"reward server {self.url}: reward {self.name!r} {what} after {attempts} attempt(s) in "
               f"{time.monotonic() - t0:.1f}s; last {'status' if status is not None else 'error'}: {last}")
        return RewardServerError(msg, url=self.url, status=status, attempts=attempts, last_error=last)

    # ---------------------------------------------------------------------------------------- one request
    def _post(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict], t_call: float
              ) -> RewardOutput:
        import requests

        body, ctype = self._encode(images, prompts, metadata)
        deadline = t_call + self.retry_budget_s
        attempts, last, status = 0, "", None
        while True:
            attempts += 1
            retry_after = 0.0
            with self._lock:
                self.stats["requests"] += 1
            try:
                r = self._session().post(self.url, data=body, headers={"Content-Type": ctype},
                                         timeout=(self.connect_timeout_s, self.timeout_s))
            except (requests.ConnectionError, requests.Timeout) as e:
                status, last = None, f"{type(e).__name__}: {e}"
            except requests.RequestException as e:  # e.g. ChunkedEncodingError from a dying server
                status, last = None, f"{type(e).__name__}: {e}"
            else:
                status = r.status_code
                if status == 200:
                    return self._parse(r, len(images), attempts, t_call)
                last = f"HTTP {status} {r.reason}: {_server_message(r)}"
                if status == 413 and len(images) > 1:
                    raise _SplitChunk()
                if not (status >= 500 or status in _RETRY_STATUSES):
                    raise self._fail("was rejected", attempts, t_call, last, status)
                try:
                    retry_after = float(r.headers.get("Retry-After", 0) or 0)
                except ValueError:
                    retry_after = 0.0
            if attempts > self.max_retries:
                raise self._fail(f"failed (max_retries={self.max_retries} exhausted)", attempts, t_call, last,
                                 status)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"failed (retry budget {self.retry_budget_s:g}s exhausted)", attempts, t_call,
                                 last, status)
            delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempts - 1))
            delay *= 0.5 + 0.5 * self._rng.random()  # jitter
            delay = min(max(delay, retry_after), remaining)  # Retry-After wins, within the budget
            log.warning("reward server %s (%s): attempt %d failed (%s); retrying in %.2fs", self.url, self.name,
                        attempts, last[:200], delay)
            with self._lock:
                self.stats["retries"] += 1
            time.sleep(delay)

    def _parse(self, r: Any, n: int, attempts: int, t0: float) -> RewardOutput:
        try:
            body = r.json()
            scores = np.asarray([np.nan if s is None else s for s in body["scores"]], dtype=np.float64)
            details = list(body.get("details") or [])
        except (ValueError, KeyError, TypeError) as e:
            raise self._fail("got a malformed response", attempts, t0, f"HTTP 200: {type(e).__name__}: {e}",
                             200) from None
        if scores.shape != (n,) or (details and len(details) != n):
            raise self._fail("got a malformed response", attempts, t0,
                             f"HTTP 200: {scores.shape} scores / {len(details)} details for {n} images", 200)
        return RewardOutput(scores, details)

    def _score_chunk(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict], t_call: float
                     ) -> RewardOutput:
        try:
            return self._post(images, prompts, metadata, t_call)
        except _SplitChunk:
            h = len(images) // 2
            log.warning("reward server %s: %d images per request too large (413); splitting", self.url, len(images))
            a = self._score_chunk(images[:h], prompts[:h], metadata[:h], t_call)
            b = self._score_chunk(images[h:], prompts[h:], metadata[h:], t_call)
            return RewardOutput(np.concatenate([a.scores, b.scores]),
                                a.details + b.details if a.details and b.details else [])

    # ---------------------------------------------------------------------------------------- interface
    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> RewardOutput:
        images = as_uint8(images)
        n = len(images)
        prompts = list(prompts) if prompts is not None else [""] * n
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        if len(prompts) != n or len(metadata) != n:
            raise ValueError(f"{n} images but {len(prompts)} prompts and {len(metadata)} metadata entries")
        if n == 0:
            return RewardOutput(np.zeros(0, dtype=np.float64), [])
        t_call = time.monotonic()
        spans = [(s, min(s + self.chunk_size, n)) for s in range(0, n, self.chunk_size)]
        if len(spans) == 1 or self.max_parallel_chunks == 1:
            outs = [self._score_chunk(images[a:b], prompts[a:b], metadata[a:b], t_call) for a, b in spans]
        else:
            pool = self._pool()
            futs = [pool.submit(self._score_chunk, images[a:b], prompts[a:b], metadata[a:b], t_call)
                    for a, b in spans]
            outs = [f.result() for f in futs]
        scores = np.concatenate([o.scores for o in outs])
        details = [d for o in outs for d in o.details] if all(o.details for o in outs) else []
        return RewardOutput(scores, details)

    def wait_ready(self, timeout_s: float = 600.0, poll_s: float = 0.5) -> None:
        """Block until ``GET /readyz`` is 200 (models loaded), or raise RewardServerError after ``timeout_s``."""
        import requests

        t0, last, status = time.monotonic(), "", None
        attempts = 0
        while True:
            attempts += 1
            try:
                r = self._session().get(self.base_url + "/readyz", timeout=(self.connect_timeout_s, 10.0))
                if r.status_code == 200:
                    return
                status, last = r.status_code, f"HTTP {r.status_code}: {r.text.strip()[:300]}"
            except requests.RequestException as e:
                status, last = None, f"{type(e).__name__}: {e}"
            if time.monotonic() - t0 > timeout_s:
                raise self._fail(f"not ready (waited {timeout_s:g}s)", attempts, t0, last, status)
            time.sleep(poll_s)
