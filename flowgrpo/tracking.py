"""MLflow tracking behind the logger seam (:class:`flowgrpo.metrics.MetricsLogger`), rank 0 only.

What goes to MLflow (``metrics.jsonl`` on disk stays the always-on record):

* params: the flattened run config (dotted keys, values cut to MLflow's length limits), in batches;
* metrics: every numeric field of each ``metrics.jsonl`` record (per-reward components included), step =
  epoch; ``None`` / non-finite values are skipped exactly as ``metrics.jsonl`` writes them as ``null``;
* artifacts: image grids (``samples/<key>-<step>.png`` + the full captions as JSON), ``config.yaml``, and at
  :meth:`MlflowLogger.close` the reward/KL curves (``curves/reward_kl.png``) and ``metrics.jsonl``;
* lineage tags: ``kfp.run_id`` ($KFP_RUN_ID), ``kfp.pipeline_version`` ($KFP_PIPELINE_VERSION), ``git.sha``
  ($FLOWGRPO_GIT_SHA or ``git rev-parse HEAD`` of the source checkout), ``image.digest``
  ($FLOWGRPO_IMAGE_DIGEST), ``base_model.id`` / ``base_model.revision`` and the ``checkpoint_uri`` /
  ``final_uri`` links (weights never go through the MLflow artifact proxy).

Where: ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded store: sqlite
``<state dir>/mlflow.db`` with artifacts under ``<state dir>/mlartifacts/`` (state dir = ``$FLOWGRPO_HOME``
or ``~/.local/share/flowgrpo``), so a laptop run needs no server (``flowgrpo mlflow-ui`` browses it).
With ``$MLFLOW_RUN_ID`` set (the KFP MLflow plugin sets it) the logger logs into that run; a training run
resumed from a checkpoint continues the run recorded in ``<output_dir>/mlflow_run.json``; otherwise a new run
is created in ``tracking.experiment`` (created when missing).

Failure handling: unreachable at start -> :class:`TrackingUnavailableError` naming the URI, or with
``tracking.required=false`` a warning and no MLflow logging. Lost mid-run -> calls are queued (bounded) and
retried with exponential backoff on later calls and at close (until a deadline); each MLflow HTTP call made
by the logger has a short timeout and no hidden retries, so a dead server never stalls an epoch for long.
The logger never raises into the training loop.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from flowgrpo.config import RunConfig

log = logging.getLogger("flowgrpo.tracking")

RUN_FILE = "mlflow_run.json"
#: lineage tag name -> environment variable it is read from
ENV_TAGS = {
    "kfp.run_id": "KFP_RUN_ID",
    "kfp.pipeline_version": "KFP_PIPELINE_VERSION",
    "image.digest": "FLOWGRPO_IMAGE_DIGEST",
}
#: MLflow limits (mlflow.utils.validation; repeated here so importing this module does not import mlflow)
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250

# error codes of a server that answered but could not do it now (retried a few times per call)
_TRANSIENT_CODES = {
    "INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "IO_ERROR", "SERVICE_UNDER_MAINTENANCE",
    "WORKSPACE_TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED",
    "ABORTED", "COULD_NOT_ACQUIRE_LOCK", "UNPARSEABLE_HTTP_ERROR",
}


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store could not be reached (or used) when the run started."""

    def __init__(self, uri: str, reason: str):
        self.uri, self.reason = uri, reason
        super().__init__(
            f"MLflow tracking at {uri} is unavailable: {reason}. Start the server or fix tracking.tracking_uri "
            f"/ $MLFLOW_TRACKING_URI, set tracking.required=false to train with metrics.jsonl only, or "
            f"tracking.enabled=false to turn MLflow off.")


# ------------------------------------------------------------------------------------------ locations

def state_dir() -> Path:
    """``$FLOWGRPO_HOME`` or ``~/.local/share/flowgrpo``: where the embedded MLflow store lives."""
    home = os.environ.get("FLOWGRPO_HOME")
    return Path(home).expanduser().resolve() if home else Path.home() / ".local" / "share" / "flowgrpo"


def embedded_tracking_uri() -> str:
    return f"sqlite:///{state_dir() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """An explicit URI, else ``$MLFLOW_TRACKING_URI``, else the embedded sqlite store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri()


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


def _default_artifact_location(uri: str, experiment: str) -> str | None:
    """For a sqlite store, artifacts next to the DB (MLflow would pick ./mlruns relative to the cwd);
    for a server, None (the server decides, e.g. proxied ``mlflow-artifacts:/`` on S3)."""
    db = _sqlite_path(uri)
    if db is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment) or "default"
    return (db.parent.resolve() / "mlartifacts" / safe).as_uri()


def _prepare_store(uri: str) -> None:
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------------------ HTTP limits

_ENV_LOCK = threading.RLock()


@contextlib.contextmanager
def short_timeouts(timeout_s: int, max_retries: int = 0, backoff_factor: int = 0):
    """MLflow reads its HTTP timeout/retry settings from the environment at every request; set them low
    for the duration of our own calls (and restore them after), so a dead or hung server fails a call in
    about ``timeout_s`` instead of MLflow's default 120 s x 7 retries with backoff."""
    values = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, timeout_s))),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(max_retries)),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(int(backoff_factor)),
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    }
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _default_timeout() -> int:
    return int(float(os.environ.get("FLOWGRPO_TRACKING_TIMEOUT", "10")))


def _unreachable(exc: BaseException) -> bool:
    """Connection refused / reset / timed out anywhere in the exception chain (MLflow wraps the requests
    exception in an MlflowException message, keeping it as __context__)."""
    import requests

    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return True
        e = e.__cause__ or e.__context__
    text = str(exc)
    return any(s in text for s in ("Connection refused", "NewConnectionError", "timed out", "RemoteDisconnected",
                                   "Connection aborted", "ConnectionResetError"))


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def _transient(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return True  # OSError, requests / botocore errors, sqlite busy, ...
    return _unreachable(exc) or _error_code(exc) in _TRANSIENT_CODES


# ------------------------------------------------------------------------------------------ params / tags

def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys; lists and other leaves stay values (empty dicts are kept as ``{}``)."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = tree
    return out


_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")


def clean_key(key: str) -> str:
    """MLflow keys: alphanumerics, ``_ - . space / :``, at most 250 characters."""
    return _KEY_BAD.sub("_", key)[:MAX_KEY_LENGTH]


def param_value(v: Any) -> str:
    if isinstance(v, str):
        s = v
    elif isinstance(v, (list, tuple, dict)):
        s = json.dumps(v, default=str)
    else:
        s = str(v)
    if len(s) > MAX_PARAM_VAL_LENGTH:
        s = s[: MAX_PARAM_VAL_LENGTH - 3] + "..."
    return s


def config_params(cfg: RunConfig) -> dict[str, str]:
    return {clean_key(k): param_value(v) for k, v in flatten(cfg.to_dict()).items()}


def numeric_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics record (nested dicts dotted); bools, None and non-finite skipped."""
    out = {}
    for k, v in flatten(record).items():
        if hasattr(v, "item") and getattr(v, "size", 1) == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(float(v)):
            continue
        out[clean_key(k)] = float(v)
    return out


def git_sha() -> str | None:
    """``$FLOWGRPO_GIT_SHA``, else ``git rev-parse HEAD`` of the checkout this package runs from."""
    sha = os.environ.get("FLOWGRPO_GIT_SHA")
    if sha:
        return sha
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                           capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


def _abs_uri(uri: str, default: Path) -> str:
    if not uri:
        return str(default.resolve())
    if "://" in uri:
        return uri
    return str(Path(uri).resolve())


def lineage_tags(cfg: RunConfig) -> dict[str, str]:
    """The run's lineage: pipeline run, source, image, base model, and where its weights are (links)."""
    tags: dict[str, str] = {}
    for tag, env in ENV_TAGS.items():
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    sha = git_sha()
    if sha:
        tags["git.sha"] = sha
        tags["mlflow.source.git.commit"] = sha
    tags["base_model.id"] = cfg.model.path
    if cfg.model.revision:
        tags["base_model.revision"] = cfg.model.revision
    out = Path(cfg.output_dir)
    tags["checkpoint_uri"] = _abs_uri(cfg.storage.checkpoint_uri, out / "checkpoints")
    tags["final_uri"] = _abs_uri(cfg.storage.final_uri, out / "final")
    tags["output_dir"] = str(out.resolve())
    tags["flowgrpo.model_family"] = cfg.model.family
    return {k: v[:MAX_TAG_VAL_LENGTH] for k, v in tags.items()}


# ------------------------------------------------------------------------------------------ the logger

@dataclass
class _Op:
    what: str  # for messages: "metrics step 3", "artifact samples/train-00003.png", ...
    fn: Callable[[], None]
    kind: str = "call"  # "metrics" | "artifact" | "call" | "end"
    attempts: int = 0
    files: list[Path] = field(default_factory=list)  # staged files to delete once delivered or dropped


class MlflowLogger:
    """The MetricsLogger seam over one MLflow run (see the module docstring).

    Build it with :func:`open_tracking` (config, environment and ``mlflow_run.json`` handling) or directly
    with a tracking URI and a run id. Every public method swallows tracking errors (warning once per outage);
    calls that could not be delivered wait in a bounded queue, retried on later calls and at :meth:`close`.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, output_dir: str | Path | None = None,
                 timeout_s: int | None = None, max_pending: int = 2000, max_attempts: int = 5,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0, close_timeout_s: float | None = None):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.timeout_s = timeout_s if timeout_s is not None else _default_timeout()
        self.max_pending, self.max_attempts = max_pending, max_attempts
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.close_timeout_s = (close_timeout_s if close_timeout_s is not None
                                else float(os.environ.get("FLOWGRPO_TRACKING_CLOSE_TIMEOUT", "60")))
        self._pending: deque[_Op] = deque()
        self._lock = threading.RLock()
        self._failures = 0  # consecutive failed attempts (drives the backoff)
        self._retry_at = 0.0
        self._outage_since: float | None = None
        self.dropped = 0
        self._closed = False
        self._history: list[dict[str, Any]] = []
        self._staging = Path(tempfile.mkdtemp(prefix="flowgrpo-mlflow-"))

    # ---------------------------------------------------------------------------------- seam
    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        try:
            from mlflow.entities import Metric

            self._history.append(dict(metrics))
            values = numeric_metrics(metrics)
            ts = int(time.time() * 1000)
            items = [Metric(k, v, ts, int(step)) for k, v in values.items()]
            for i in range(0, len(items), MAX_METRICS_PER_BATCH):
                chunk = items[i : i + MAX_METRICS_PER_BATCH]
                self._submit(_Op(f"metrics of step {step}",
                                 lambda c=chunk: self.client.log_batch(self.run_id, metrics=c), kind="metrics"))
        except Exception as e:  # never into the training loop
            log.warning("tracking: could not log metrics of step %s: %s", step, e)

    def log_images(self, key: str, images: np.ndarray, captions: Sequence[str], step: int) -> None:
        try:
            if images is None or len(images) == 0:
                return
            from flowgrpo.metrics import image_grid, save_gifs

            name = f"{clean_key(key).replace('/', '_')}-{int(step):05d}"
            d = self._staging / f"{name}-{time.monotonic_ns()}"
            d.mkdir(parents=True)
            png, caps = d / f"{name}.png", d / f"{name}.json"
            image_grid(np.asarray(images), list(captions)).save(png)
            caps.write_text(json.dumps({"key": key, "step": int(step), "captions": list(captions)}, indent=1))
            gifs = save_gifs(np.asarray(images), d, name) if np.ndim(images) == 5 else []  # videos: a GIF per sample
            self._submit(_Op(f"image grid samples/{png.name}",
                             lambda: self._log_files([png, caps, *gifs], "samples"), kind="artifact", files=[d]))
        except Exception as e:
            log.warning("tracking: could not log image grid %s/%s: %s", key, step, e)

    def close(self, status: str = "FINISHED") -> None:
        """Log the curves and ``metrics.jsonl``, end the run with ``status`` (FINISHED / FAILED / KILLED),
        and flush the queue, retrying with backoff for up to ``close_timeout_s``; never raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._log_final_artifacts()
        except Exception as e:
            log.warning("tracking: could not prepare the final artifacts: %s", e)
        self._submit(_Op(f"end of run ({status})", lambda: self.client.set_terminated(self.run_id, status=status),
                         kind="end"), drain=False)
        self.flush(self.close_timeout_s)
        if self._pending:
            log.warning("tracking: %d MLflow call(s) could not be delivered to %s within %.0f s (run %s); "
                        "metrics.jsonl has everything", len(self._pending), self.tracking_uri, self.close_timeout_s,
                        self.run_id)
        shutil.rmtree(self._staging, ignore_errors=True)

    # ---------------------------------------------------------------------------------- queue
    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self, timeout_s: float) -> bool:
        """Deliver queued calls, waiting out the backoff, until empty or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._drain(force=True):
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            time.sleep(max(0.05, min(self._retry_at - now, deadline - now, 5.0)))

    def _submit(self, op: _Op, drain: bool = True) -> None:
        with self._lock:
            self._pending.append(op)
            while len(self._pending) > self.max_pending:
                self._drop_one()
        if drain:
            self._drain()

    def _drop_one(self) -> None:
        # images first (metrics matter more and are small), never the end-of-run call
        victim = next((o for o in self._pending if o.kind == "artifact"), None)
        victim = victim or next(o for o in self._pending if o.kind != "end")
        self._pending.remove(victim)
        self._discard(victim)
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 100 == 0:
            log.warning("tracking: queue full (%d calls); dropped %d so far (oldest first, e.g. %s)",
                        self.max_pending, self.dropped, victim.what)

    def _discard(self, op: _Op) -> None:
        for p in op.files:
            shutil.rmtree(p, ignore_errors=True)

    def _drain(self, force: bool = False) -> bool:
        """Try the queued calls in order; stop at the first failure. True when the queue is empty."""
        with self._lock:
            if not self._pending:
                return True
            if not force and time.monotonic() < self._retry_at:
                return False
            while self._pending:
                op = self._pending[0]
                try:
                    with short_timeouts(self.timeout_s):
                        op.fn()
                except Exception as e:
                    op.attempts += 1
                    if not _transient(e) or (not _unreachable(e) and op.attempts >= self.max_attempts):
                        self._pending.popleft()
                        self._discard(op)
                        self.dropped += 1
                        log.warning("tracking: MLflow refused %s after %d attempt(s), dropped: %s",
                                    op.what, op.attempts, _short(e))
                        continue
                    self._failures += 1
                    delay = min(self.backoff_s * 2 ** (self._failures - 1), self.max_backoff_s)
                    self._retry_at = time.monotonic() + delay
                    if self._outage_since is None:
                        self._outage_since = time.monotonic()
                        log.warning("tracking: MLflow at %s unreachable (%s); queueing calls (%d pending), "
                                    "retrying with backoff", self.tracking_uri, _short(e), len(self._pending))
                    return False
                self._pending.popleft()
                self._discard(op)
                if self._outage_since is not None:
                    log.warning("tracking: MLflow at %s reachable again after %.0f s; delivering queued calls",
                                self.tracking_uri, time.monotonic() - self._outage_since)
                    self._outage_since = None
                self._failures = 0
                self._retry_at = 0.0
            return True

    def _log_files(self, files: Iterable[Path], artifact_path: str) -> None:
        for f in files:
            self.client.log_artifact(self.run_id, str(f), artifact_path)

    # ---------------------------------------------------------------------------------- end of run
    def _records(self) -> list[dict[str, Any]]:
        if self.output_dir is not None and (self.output_dir / "metrics.jsonl").is_file():
            try:
                lines = (self.output_dir / "metrics.jsonl").read_text().splitlines()
                return [json.loads(ln) for ln in lines if ln.strip()]
            except (OSError, ValueError):
                pass
        return self._history

    def _log_final_artifacts(self) -> None:
        records = [r for r in self._records() if not r.get("final")]
        d = self._staging / "final"
        d.mkdir(exist_ok=True)
        files: list[tuple[Path, str]] = []
        if records:
            png = d / "reward_kl.png"
            plot_curves(records, png)
            files.append((png, "curves"))
        if self.output_dir is not None and (self.output_dir / "metrics.jsonl").is_file():
            shutil.copy(self.output_dir / "metrics.jsonl", d / "metrics.jsonl")
            files.append((d / "metrics.jsonl", "metrics"))
        for f, where in files:
            self._submit(_Op(f"artifact {where}/{f.name}", lambda f=f, w=where: self._log_files([f], w),
                             kind="artifact"), drain=False)


def _short(e: BaseException, n: int = 300) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) <= n else s[: n - 3] + "..."


# ------------------------------------------------------------------------------------------ curves

def plot_curves(records: list[dict[str, Any]], path: Path) -> Path:
    """Reward (mean ± std, per-reward components, eval) and KL per epoch as one PNG (matplotlib, no pyplot
    state; a plain PIL drawing when matplotlib is missing)."""
    epochs = [r.get("epoch", i) for i, r in enumerate(records)]

    def series(key: str) -> list[float]:
        return [float(r[key]) if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
                else float("nan") for r in records]

    reward_keys = ["reward_mean"] + sorted(k for k in {k for r in records for k in r}
                                           if k.startswith("reward_") and k.endswith("_mean") and k != "reward_mean")
    eval_keys = sorted(k for k in {k for r in records for k in r} if k.startswith("eval_reward"))
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib comes with mlflow
        return _plot_curves_pil(epochs, {k: series(k) for k in reward_keys + eval_keys}, series("kl"), path)
    fig = Figure(figsize=(10, 4), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    for k in reward_keys:
        ax1.plot(epochs, series(k), marker=".", label=k)
    mean, std = np.array(series("reward_mean")), np.array(series("reward_std"))
    if np.isfinite(std).any():
        ax1.fill_between(epochs, mean - std, mean + std, alpha=0.2, label="reward_mean ± std")
    for k in eval_keys:
        ax1.plot(epochs, series(k), marker="o", linestyle="--", label=k)
    ax1.set(title="reward", xlabel="epoch")
    ax1.legend(fontsize=7)
    kl = np.array(series("kl"))
    if np.isfinite(kl).any():
        ax2.plot(epochs, kl, marker=".", color="tab:red", label="kl")
        ax2.legend(fontsize=7)
    else:
        ax2.text(0.5, 0.5, "no KL logged (train.beta = 0)", ha="center", va="center", transform=ax2.transAxes)
    ax2.set(title="KL to reference", xlabel="epoch")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _plot_curves_pil(epochs: list[int], rewards: dict[str, list[float]], kl: list[float], path: Path) -> Path:
    from PIL import Image, ImageDraw

    w, h, pad = 400, 300, 30
    img = Image.new("RGB", (2 * w, h), "white")
    draw = ImageDraw.Draw(img)
    colors = ["blue", "green", "orange", "purple", "brown", "gray"]

    def panel(x0: int, title: str, lines: dict[str, list[float]]) -> None:
        draw.rectangle([x0 + pad, pad, x0 + w - pad, h - pad], outline="black")
        draw.text((x0 + pad, 8), title, fill="black")
        vals = [v for ys in lines.values() for v in ys if math.isfinite(v)]
        if not vals or not epochs:
            return
        lo, hi = min(vals), max(vals)
        hi = hi if hi > lo else lo + 1e-12
        e0, e1 = min(epochs), max(max(epochs), min(epochs) + 1)
        for i, (name, ys) in enumerate(lines.items()):
            pts = [(x0 + pad + (e - e0) / (e1 - e0) * (w - 2 * pad), h - pad - (y - lo) / (hi - lo) * (h - 2 * pad))
                   for e, y in zip(epochs, ys) if math.isfinite(y)]
            c = colors[i % len(colors)]
            if len(pts) > 1:
                draw.line(pts, fill=c, width=2)
            draw.text((x0 + pad + 4, pad + 4 + 12 * i), name, fill=c)

    panel(0, "reward", rewards)
    panel(w, "KL to reference", {"kl": kl})
    img.save(path)
    return path


# ------------------------------------------------------------------------------------------ opening a run

def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _get_or_create_experiment(client, uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_default_artifact_location(uri, name))
        except MlflowException as e:  # another process created it meanwhile
            if _error_code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def check_tracking(uri: str, experiment: str, timeout_s: int | None = None) -> str:
    """Reach the store and get (or create) the experiment; returns its id. Raises
    :class:`TrackingUnavailableError` naming the URI."""
    timeout_s = timeout_s if timeout_s is not None else _default_timeout()
    try:
        _prepare_store(uri)
        with short_timeouts(timeout_s):
            return _get_or_create_experiment(_client(uri), uri, experiment)
    except TrackingUnavailableError:
        raise
    except Exception as e:
        raise TrackingUnavailableError(uri, _short(e)) from e


def preflight(cfg: RunConfig) -> bool:
    """Before any model is built: is tracking usable? True, or False (warned) with ``tracking.required=false``;
    raises :class:`TrackingUnavailableError` otherwise. False when ``tracking.enabled`` is off."""
    if not cfg.tracking.enabled:
        return False
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    try:
        check_tracking(uri, cfg.tracking.experiment)
        return True
    except TrackingUnavailableError as e:
        if cfg.tracking.required:
            raise
        log.warning("%s -- continuing without MLflow (tracking.required=false); metrics.jsonl only", e)
        return False


def _previous_run(output_dir: Path, uri: str) -> str | None:
    f = output_dir / RUN_FILE
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return info.get("run_id") if info.get("tracking_uri") == uri else None


def open_tracking(cfg: RunConfig, *, resumed: bool = False, **logger_kwargs: Any) -> MlflowLogger | None:
    """The run's :class:`MlflowLogger` (rank 0 only), or None when tracking is disabled or unavailable with
    ``tracking.required=false``.

    Run selection: ``$MLFLOW_RUN_ID`` if set; else, when the training ``resumed`` from a checkpoint, the run
    recorded in ``<output_dir>/mlflow_run.json`` (if it still exists on the same store); else a new run in
    ``tracking.experiment``. Logs params (only those the run lacks; changed values are warned about) and
    lineage tags, uploads ``config.yaml`` when present, and writes ``<output_dir>/mlflow_run.json``.
    """
    if not cfg.tracking.enabled:
        return None
    from mlflow.entities import Param, RunTag

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    out = Path(cfg.output_dir)
    timeout = _default_timeout()
    try:
        exp_id = check_tracking(uri, cfg.tracking.experiment, timeout)
        client = _client(uri)
        with short_timeouts(timeout):
            run_id = os.environ.get("MLFLOW_RUN_ID") or (_previous_run(out, uri) if resumed else None)
            run = None
            if run_id:
                try:
                    run = client.get_run(run_id)
                except Exception as e:
                    if os.environ.get("MLFLOW_RUN_ID"):
                        raise TrackingUnavailableError(uri, f"MLFLOW_RUN_ID={run_id} cannot be read ({_short(e)})")
                    run = None  # the recorded run is gone: start a new one
            if run is None:
                run = client.create_run(exp_id, run_name=cfg.tracking.run_name or None)
            elif run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
            run_id = run.info.run_id
            have = run.data.params
            params = config_params(cfg)
            changed = sorted(k for k, v in params.items() if k in have and have[k] != v)
            if changed:
                log.warning("tracking: run %s already has different values for %s; keeping the logged ones "
                            "(MLflow params are immutable)", run_id, ", ".join(changed[:10]))
            todo = [Param(k, v) for k, v in params.items() if k not in have]
            tags = [RunTag(k, v) for k, v in lineage_tags(cfg).items()]
            for i in range(0, max(len(todo), len(tags)), MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, params=todo[i : i + MAX_PARAMS_PER_BATCH],
                                 tags=tags[i : i + MAX_PARAMS_PER_BATCH])
            if (out / "config.yaml").is_file():
                client.log_artifact(run_id, str(out / "config.yaml"))
    except TrackingUnavailableError as e:
        if cfg.tracking.required:
            raise
        log.warning("%s -- continuing without MLflow (tracking.required=false); metrics.jsonl only", e)
        return None
    except Exception as e:
        err = TrackingUnavailableError(uri, _short(e))
        if cfg.tracking.required:
            raise err from e
        log.warning("%s -- continuing without MLflow (tracking.required=false); metrics.jsonl only", err)
        return None
    out.mkdir(parents=True, exist_ok=True)
    info = {"run_id": run_id, "experiment_id": run.info.experiment_id, "experiment": cfg.tracking.experiment,
            "tracking_uri": uri, "artifact_uri": run.info.artifact_uri}
    if uri.startswith(("http://", "https://")):
        info["run_url"] = f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    (out / RUN_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return MlflowLogger(uri, run_id, output_dir=out, timeout_s=timeout, **logger_kwargs)


def read_run_file(output_dir: str | Path) -> dict[str, Any]:
    """``<output_dir>/mlflow_run.json`` (run_id, experiment_id, tracking_uri, ...) for the register step."""
    return json.loads((Path(output_dir) / RUN_FILE).read_text())


def close_logger(logger: Any, status: str = "FINISHED") -> None:
    """Close a logger (or every logger of a MultiLogger), passing ``status`` to those whose ``close``
    takes it (MlflowLogger); a failing close is warned about, never raised."""
    if logger is None:
        return
    for lg in getattr(logger, "loggers", None) or [logger]:
        try:
            if "status" in inspect.signature(lg.close).parameters:
                lg.close(status=status)
            else:
                lg.close()
        except Exception as e:
            log.warning("closing %s failed: %s", type(lg).__name__, e)
