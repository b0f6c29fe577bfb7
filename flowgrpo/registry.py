"""The MLflow model registry: register trained weights, gate promotions, roll back.

Conventions (MLflow aliases + tags; stages are deprecated):

* A registered version's ``source`` is the storage URI of the final diffusers weights (``s3://...`` or a
  path): the weights never travel through MLflow. It carries the lineage tags (``kfp.run_id``,
  ``kfp.pipeline_version``, ``git.sha``, ``image.digest``, ``base_model.id``, ``base_model.revision``,
  ``checkpoint_uri``, ``final_uri``, copied from the training run and overridable) and its evaluation
  metrics as ``metric.<name>`` tags.
* Alias ``candidate``: the newest registered version (moved by every :func:`register`).
* Alias ``champion``: the served version, moved only by :func:`promote` when a :class:`Gate` passes, or by
  :func:`rollback`. Every promotion pushes the replaced champion onto the registered-model tag
  ``champion.history`` (a JSON list, newest last; ``champion.previous`` holds the last one for people);
  :func:`rollback` pops it.
* :func:`register` is idempotent per KFP run: a retried task finds the version tagged with its
  ``kfp.run_id`` and updates its tags instead of adding a version.

Gate file (YAML; see :class:`Gate`)::

    metric: geneval_overall       # the primary metric (version tag metric.geneval_overall)
    min_improvement: 0.005        # candidate - champion must be >= this (absolute; may be 0 or negative)
    higher_is_better: true        # default true; false: champion - candidate is the improvement
    guards:                       # "gold" metrics that must not regress by more than max_drop (absolute)
      drawbench_aesthetic: 0.05                               # shorthand: the max_drop
      drawbench_pickscore: {max_drop: 0.01, higher_is_better: true}

Rules: no champion yet -> promote if the candidate has the primary metric. Champion without the primary
metric -> promote (nothing to compare; said in the reasons). A guarded metric the champion reports but the
candidate lacks -> refuse; one the champion lacks -> not checked (said in the reasons).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flowgrpo.tracking import _prepare_store, resolve_tracking_uri, short_timeouts

CANDIDATE = "candidate"
CHAMPION = "champion"
HISTORY_TAG = "champion.history"
PREVIOUS_TAG = "champion.previous"
METRIC_PREFIX = "metric."
#: run tags copied onto a registered version
LINEAGE_TAGS = ("kfp.run_id", "kfp.pipeline_version", "git.sha", "image.digest", "base_model.id",
                "base_model.revision", "checkpoint_uri", "final_uri")
_HISTORY_MAX = 50
_EPS = 1e-12


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (unknown version, nothing to roll back to, ...)."""


class GateError(ValueError):
    """An invalid gate definition: names the field, the value and what is allowed."""


# ------------------------------------------------------------------------------------------ the gate

@dataclass
class Guard:
    """A "gold" metric that must not drop by more than ``max_drop`` (absolute) versus the champion."""

    max_drop: float
    higher_is_better: bool = True


@dataclass
class Gate:
    """Promotion rule: the candidate's ``metric`` must beat the champion's by ``min_improvement`` and no
    guarded metric may drop by more than its ``max_drop``."""

    metric: str
    min_improvement: float = 0.0
    higher_is_better: bool = True
    guards: dict[str, Guard] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise GateError(f"gate.metric={self.metric!r}: a metric name, e.g. geneval_overall")
        self.min_improvement = _number("gate.min_improvement", self.min_improvement)
        if not isinstance(self.higher_is_better, bool):
            raise GateError(f"gate.higher_is_better={self.higher_is_better!r}: true or false")
        if not isinstance(self.guards, dict):
            raise GateError(f"gate.guards={self.guards!r}: a mapping metric -> max_drop or {{max_drop, higher_is_better}}")
        guards = {}
        for name, g in self.guards.items():
            where = f"gate.guards.{name}"
            if isinstance(g, Guard):
                pass
            elif isinstance(g, (int, float)) and not isinstance(g, bool):
                g = Guard(float(g))
            elif isinstance(g, dict):
                unknown = set(g) - {"max_drop", "higher_is_better"}
                if unknown or "max_drop" not in g:
                    raise GateError(f"{where}={g!r}: a number (max_drop) or {{max_drop: X, higher_is_better: bool}}")
                if not isinstance(g.get("higher_is_better", True), bool):
                    raise GateError(f"{where}.higher_is_better={g['higher_is_better']!r}: true or false")
                g = Guard(_number(f"{where}.max_drop", g["max_drop"]), g.get("higher_is_better", True))
            else:
                raise GateError(f"{where}={g!r}: a number (max_drop) or {{max_drop: X, higher_is_better: bool}}")
            g.max_drop = _number(f"{where}.max_drop", g.max_drop)
            if g.max_drop < 0:
                raise GateError(f"{where}.max_drop={g.max_drop!r}: a number >= 0")
            guards[str(name)] = g
        self.guards = guards

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Gate:
        if not isinstance(data, dict):
            raise GateError(f"gate={data!r}: a mapping with at least 'metric'")
        known = {"metric", "min_improvement", "higher_is_better", "guards"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GateError(f"gate.{unknown[0]}: not a field; known fields: {sorted(known)}")
        if "metric" not in data:
            raise GateError("gate.metric: missing; the metric to compare, e.g. geneval_overall")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Gate:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise GateError(f"--gate {path}: not a file (a YAML gate, see flowgrpo.registry)")
        return cls.from_dict(yaml.safe_load(p.read_text()) or {})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def evaluate(self, candidate: dict[str, float], champion: dict[str, float] | None) -> tuple[bool, list[str]]:
        """(passed, reasons) for the candidate's metrics versus the champion's (None: no champion)."""
        reasons: list[str] = []
        ok = True
        m = self.metric
        if m not in candidate:
            return False, [f"candidate has no {METRIC_PREFIX}{m} tag (the gate metric)"]
        if champion is None:
            reasons.append(f"no champion yet; candidate {m}={candidate[m]:.6g}")
        elif m not in champion:
            reasons.append(f"champion has no {m} to compare with; candidate {m}={candidate[m]:.6g}")
        else:
            delta = candidate[m] - champion[m] if self.higher_is_better else champion[m] - candidate[m]
            passed = delta >= self.min_improvement - _EPS
            ok &= passed
            reasons.append(f"{m}: candidate {candidate[m]:.6g} vs champion {champion[m]:.6g}, improvement "
                           f"{delta:+.6g} {'>=' if passed else '<'} required {self.min_improvement:g}")
        for name, g in self.guards.items():
            if champion is None or name not in champion:
                reasons.append(f"guard {name}: no champion value, not checked")
                continue
            if name not in candidate:
                ok = False
                reasons.append(f"guard {name}: candidate has no {METRIC_PREFIX}{name} but the champion has "
                               f"{champion[name]:.6g}")
                continue
            drop = champion[name] - candidate[name] if g.higher_is_better else candidate[name] - champion[name]
            passed = drop <= g.max_drop + _EPS
            ok &= passed
            reasons.append(f"guard {name}: candidate {candidate[name]:.6g} vs champion {champion[name]:.6g}, "
                           f"drop {drop:+.6g} {'<=' if passed else '>'} allowed {g.max_drop:g}")
        return ok, reasons


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise GateError(f"{name}={v!r}: a number")
    try:
        f = float(v)
    except ValueError:
        raise GateError(f"{name}={v!r}: a number") from None
    if not math.isfinite(f):
        raise GateError(f"{name}={v!r}: a finite number")
    return f


@dataclass
class PromotionResult:
    promoted: bool
    reasons: list[str]
    version: str = ""
    champion: str | None = None  # the champion after the call
    previous_champion: str | None = None  # the champion before the call

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ client

def client(tracking_uri: str | None = None):
    """An MlflowClient on ``tracking_uri`` / $MLFLOW_TRACKING_URI / the embedded store (registry = same
    store unless $MLFLOW_REGISTRY_URI says otherwise)."""
    import os

    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    _prepare_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def _calls():
    """Registry calls: 30 s per request, a few retries with a short backoff (not MLflow's minutes)."""
    return short_timeouts(30, max_retries=3, backoff_factor=1)


def _code(e: BaseException) -> str | None:
    return getattr(e, "error_code", None)


def _q(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")


def _all_versions(c, name: str) -> list:
    out, token = [], None
    while True:
        page = c.search_model_versions(f"name='{_q(name)}'", max_results=200, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _alias_version(c, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if _code(e) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _get_version(c, name: str, version: str | int):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version(name, str(version))
    except MlflowException as e:
        if _code(e) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise RegistryError(f"model {name!r} has no version {version}") from e
        raise


def version_metrics(mv) -> dict[str, float]:
    """``metric.<name>`` tags of a model version as floats (unparsable values skipped)."""
    out = {}
    for k, v in (mv.tags or {}).items():
        if k.startswith(METRIC_PREFIX):
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(f):
                out[k[len(METRIC_PREFIX):]] = f
    return out


def _history(c, name: str) -> list[str]:
    tags = c.get_registered_model(name).tags or {}
    try:
        h = json.loads(tags.get(HISTORY_TAG, "[]"))
        return [str(v) for v in h] if isinstance(h, list) else []
    except ValueError:
        return []


def _set_history(c, name: str, history: list[str]) -> None:
    history = history[-_HISTORY_MAX:]
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    c.set_registered_model_tag(name, PREVIOUS_TAG, history[-1] if history else "")


# ------------------------------------------------------------------------------------------ operations

def register(model_name: str, source_uri: str, run_id: str | None, kfp_run_id: str | None = None,
             metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None, *,
             tracking_uri: str | None = None, description: str | None = None) -> str:
    """Register ``source_uri`` (the final weights' storage URI) as a version of ``model_name`` and point
    alias ``candidate`` at it; returns the version (a string, as MLflow has it).

    Tags: the lineage tags of run ``run_id`` (if given), then ``kfp.run_id``, ``metric.<name>`` for
    ``metrics``, then ``tags``. Idempotent per ``kfp_run_id`` (default: the run's ``kfp.run_id`` tag): when
    a version with that tag exists, its tags are updated and its version returned.

    Through an MLflow *server* the source must be a remote URI (``s3://...``): the server refuses local
    paths outside the run's artifact directory. The embedded sqlite store accepts any path.
    """
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    with _calls():
        vtags: dict[str, str] = {}
        if run_id:
            run_tags = c.get_run(run_id).data.tags
            vtags.update({k: run_tags[k] for k in LINEAGE_TAGS if run_tags.get(k)})
        kfp_run_id = kfp_run_id or vtags.get("kfp.run_id")
        if kfp_run_id:
            vtags["kfp.run_id"] = str(kfp_run_id)
        for k, v in (metrics or {}).items():
            vtags[f"{METRIC_PREFIX}{k}"] = repr(float(v))
        vtags.update({k: str(v) for k, v in (tags or {}).items()})
        try:
            c.create_registered_model(model_name, description=description)
        except MlflowException as e:
            if _code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
        existing = None
        if kfp_run_id:
            same = [mv for mv in _all_versions(c, model_name) if (mv.tags or {}).get("kfp.run_id") == str(kfp_run_id)]
            existing = min(same, key=lambda mv: int(mv.version)) if same else None
        if existing is not None:
            version = str(existing.version)
            for k, v in vtags.items():
                if (existing.tags or {}).get(k) != v:
                    c.set_model_version_tag(model_name, version, k, v)
        else:
            mv = c.create_model_version(model_name, source=source_uri, run_id=run_id or None, tags=vtags,
                                        description=description)
            version = str(mv.version)
        c.set_registered_model_alias(model_name, CANDIDATE, version)
    return version


def promote(model_name: str, version: str | int, gate: Gate, *, tracking_uri: str | None = None,
            dry_run: bool = False) -> PromotionResult:
    """Move alias ``champion`` to ``version`` if ``gate`` passes against the current champion; the replaced
    champion is pushed onto ``champion.history`` for :func:`rollback`. Refusals change nothing."""
    c = client(tracking_uri)
    version = str(version)
    with _calls():
        cand = _get_version(c, model_name, version)
        champ = _alias_version(c, model_name, CHAMPION)
        before = str(champ.version) if champ is not None else None
        if before == version:
            return PromotionResult(True, [f"version {version} is already the champion"], version, before, before)
        ok, reasons = gate.evaluate(version_metrics(cand), version_metrics(champ) if champ is not None else None)
        if not ok or dry_run:
            if ok:
                reasons.append("dry run: champion not moved")
            return PromotionResult(False, reasons, version, before, before)
        now = _alias_version(c, model_name, CHAMPION)  # no server-side compare-and-set: re-read right before
        now_v = str(now.version) if now is not None else None
        if now_v != before:
            return PromotionResult(False, reasons + [f"champion moved from {before} to {now_v} during the check; "
                                                     f"retry"], version, now_v, now_v)
        if before is not None:
            _set_history(c, model_name, _history(c, model_name) + [before])
        c.set_registered_model_alias(model_name, CHAMPION, version)
        c.set_model_version_tag(model_name, version, "champion.promoted_at", _now())
        c.set_model_version_tag(model_name, version, "champion.gate", json.dumps(gate.to_dict()))
    return PromotionResult(True, reasons + [f"champion: {before} -> {version}"], version, version, before)


def rollback(model_name: str, *, tracking_uri: str | None = None) -> dict[str, str | None]:
    """Point ``champion`` back at the champion it replaced (popping ``champion.history``); returns
    ``{"champion": restored, "replaced": previous champion}``."""
    c = client(tracking_uri)
    with _calls():
        current = _alias_version(c, model_name, CHAMPION)
        cur = str(current.version) if current is not None else None
        history = _history(c, model_name)
        while history:
            prev = history.pop()
            if prev == cur:
                continue
            try:
                _get_version(c, model_name, prev)
            except RegistryError:
                continue  # deleted since: roll further back
            c.set_registered_model_alias(model_name, CHAMPION, prev)
            _set_history(c, model_name, history)
            if cur is not None:
                c.set_model_version_tag(model_name, cur, "champion.rolled_back_at", _now())
            return {"champion": prev, "replaced": cur}
        _set_history(c, model_name, history)
    raise RegistryError(f"model {model_name!r}: no previous champion to roll back to (champion is {cur})")


def show(model_name: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """The registered model: aliases, champion history, and every version (newest first) with its aliases,
    source, run, lineage and metric tags."""
    c = client(tracking_uri)
    with _calls():
        rm = c.get_registered_model(model_name)
        versions = _all_versions(c, model_name)
    aliases: dict[str, str] = {str(a): str(v) for a, v in (rm.aliases or {}).items()}
    by_version: dict[str, list[str]] = {}
    for a, v in aliases.items():
        by_version.setdefault(v, []).append(a)
    out_versions = []
    for mv in sorted(versions, key=lambda mv: int(mv.version), reverse=True):
        t = mv.tags or {}
        out_versions.append({
            "version": str(mv.version),
            "aliases": sorted(by_version.get(str(mv.version), [])),
            "source": mv.source,
            "run_id": mv.run_id,
            "status": mv.status,
            "created": mv.creation_timestamp,
            "lineage": {k: t[k] for k in LINEAGE_TAGS if k in t},
            "metrics": version_metrics(mv),
        })
    tags = rm.tags or {}
    try:
        history = json.loads(tags.get(HISTORY_TAG, "[]"))
    except ValueError:
        history = []
    return {"name": rm.name, "aliases": aliases, "champion_history": history, "versions": out_versions}


def format_show(info: dict[str, Any]) -> str:
    """``show()`` as text for the CLI."""
    lines = [f"model {info['name']}: " + (", ".join(f"{a}=v{v}" for a, v in sorted(info["aliases"].items()))
                                          or "no aliases")
             + (f"; previous champions {info['champion_history']}" if info["champion_history"] else "")]
    for v in info["versions"]:
        al = f" [{', '.join(v['aliases'])}]" if v["aliases"] else ""
        lines.append(f"  v{v['version']}{al}  {v['source']}")
        meta = {**v["lineage"], **{f"metric.{k}": f"{x:.6g}" for k, x in sorted(v["metrics"].items())}}
        if v["run_id"]:
            meta = {"run_id": v["run_id"], **meta}
        for k, x in meta.items():
            lines.append(f"      {k}: {x}")
    return "\n".join(lines)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
