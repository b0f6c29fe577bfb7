"""The pipeline's steps as plain functions: what each KFP component calls (components/ stay thin), and what
the tests call without KFP. Every step is safe to re-run (KFP retries rerun the whole task):
  fetch_model     skips when the published copy is complete;
  deploy_rewards  replaces what an earlier try left;
  train           reuses the run's MLflow run and resumes from its newest checkpoint;
  register        finds the version by the KFP run id before creating one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from typing import Any, Callable

import yaml

from flowgrpo import storage
from flowgrpo.backends.base import Backend, RewardServerSpec, TrainJobSpec, dns_name, get_backend
from flowgrpo.pipeline.params import build_run_config, parse_gate, parse_suites, procs_per_node

log = logging.getLogger(__name__)


def backend_for(name: str, namespace: str = "") -> Backend:
    """The backend ``name``; for Kubernetes, status polls every ``$FLOWGRPO_K8S_POLL_S`` seconds (default 5)."""
    if name == "kubernetes":
        import os

        return get_backend(name, namespace=namespace or None, poll_s=float(os.environ.get("FLOWGRPO_K8S_POLL_S", 5)))
    return get_backend(name)


def run_root(storage_root: str, run_id: str) -> str:
    """``<storage_root>/runs/<run id>``: the run's config, checkpoints and final weights."""
    return str(storage.join(storage_root, "runs", run_id))


def _model_slug(source: str, revision: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", source.replace("s3://", "s3--").strip("/"))
    return f"{slug}@{revision}" if revision else slug


# ------------------------------------------------------------------------------------------ fetch
def fetch_model(source: str, revision: str, storage_root: str) -> dict[str, Any]:
    """Publish ``source`` (hub id + revision, local dir, storage URI, or ``tiny[:spec]``) under
    ``<storage_root>/models/`` with a sha256 manifest; skipped when a complete copy is already there.
    Hub downloads read ``HF_TOKEN`` from the environment (a Kubernetes Secret in the cluster)."""
    from flowgrpo.models.loading import resolve_model_path

    dest = str(storage.join(storage_root, "models", _model_slug(source, revision)))
    skipped = storage.is_complete(dest)
    if skipped:
        storage.verify(dest, deep=False)
    else:
        if "/" in source and not source.startswith(("s3://", "file://", "/", ".")) and not revision:
            log.warning("fetch_model: %s has no pinned revision; the run is not reproducible (set base_model_revision "
                        "to a commit sha)", source)
        local = resolve_model_path(source, revision=revision or None)
        storage.publish_dir(local, dest)
    digest = hashlib.sha256(storage.read_bytes(storage.join(dest, storage.MANIFEST))).hexdigest()
    return {"uri": dest, "sha256": digest, "skipped": skipped, "source": source, "revision": revision}


# ------------------------------------------------------------------------------------------ rewards
def reward_server_specs(cfg, image: str = "", api_key_secret: str = "") -> list[RewardServerSpec]:
    """One server per reward of the run that is not already served elsewhere (a ``url`` option)."""
    specs = []
    for name in cfg.reward:
        opts = dict(cfg.reward_options.get(name, {}))
        if "url" in opts:
            continue
        specs.append(RewardServerSpec(name=dns_name(name, 40), rewards=[name],
                                      reward_options={name: opts} if opts else {}, image=image,
                                      api_key_secret=api_key_secret))
    return specs


def deploy_rewards(backend: str, run_id: str, preset: str, reward_weights: str = "", overrides: str = "",
                   image: str = "", api_key_secret: str = "", namespace: str = "",
                   timeout_s: float = 900) -> dict[str, str]:
    """Start the run's reward servers and wait until they are ready; returns {reward: base URL}."""
    cfg = build_run_config(preset, reward_weights, 0, overrides, world_size=None)
    specs = reward_server_specs(cfg, image, api_key_secret)
    if not specs:
        return {}
    return backend_for(backend, namespace).deploy_rewards(run_id, specs, timeout_s=timeout_s)


def teardown(backend: str, run_id: str, namespace: str = "") -> list[str]:
    return backend_for(backend, namespace).teardown(run_id)


# ------------------------------------------------------------------------------------------ training
def _mlflow_run(tracking_uri: str, experiment: str, run_id: str, run_name: str) -> str:
    """The MLflow run of KFP run ``run_id``: found by tag ``kfp.run_id`` (a retried task continues it), else new."""
    from flowgrpo.tracking import _client, check_tracking

    exp_id = check_tracking(tracking_uri, experiment)
    client = _client(tracking_uri)
    found = client.search_runs([exp_id], filter_string=f"tags.`kfp.run_id` = '{run_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    return client.create_run(exp_id, run_name=run_name, tags={"kfp.run_id": run_id}).info.run_id


def prepare_training(*, run_id: str, preset: str, reward_weights: str, epochs: int, overrides: str,
                     model_uri: str, reward_endpoints: dict[str, str], storage_root: str, world_size: int,
                     tracking_uri: str, experiment: str, work_dir: str):
    """The resolved RunConfig of the run (model from the fetch step, rewards through the deployed servers,
    checkpoints and final weights in storage), published at ``<run root>/config.yaml``. Returns (cfg, uri)."""
    from flowgrpo.config import RunConfig, _build
    from flowgrpo.rewards.remote import client_options
    from flowgrpo.tracking import resolve_tracking_uri

    cfg = build_run_config(preset, reward_weights, epochs, overrides, world_size)
    tree = cfg.to_dict()
    root = run_root(storage_root, run_id)
    tree["output_dir"] = work_dir
    tree["model"].update(path=model_uri, revision=None)
    tree["storage"] = {"checkpoint_uri": str(storage.join(root, "checkpoints")),
                       "final_uri": str(storage.join(root, "final"))}
    opts = tree["reward_options"]
    for name, url in reward_endpoints.items():
        if name in tree["reward"]:  # the model's options went to the server; the trainer keeps the client's
            opts[name] = {**client_options(opts.get(name, {})), "url": url}
    tree["tracking"].update(enabled=True, tracking_uri=resolve_tracking_uri(tracking_uri), experiment=experiment,
                            run_name=tree["tracking"]["run_name"] or f"kfp-{run_id[:8]}")
    cfg = _build(RunConfig, tree)
    uri = str(storage.join(root, "config.yaml"))
    storage.write_text(uri, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return cfg, uri


def train(*, backend: str, run_id: str, preset: str, reward_weights: str = "", epochs: int = 0,
          overrides: str = "", model_uri: str, reward_endpoints: dict[str, str], storage_root: str,
          nodes: int = 1, gpus_per_node: int = 0, procs: int = 0, tracking_uri: str = "",
          experiment: str = "flowgrpo", namespace: str = "", image: str = "", secrets: list[str] | None = None,
          tolerations: list | None = None, node_selector: dict | None = None, timeout_s: float = 48 * 3600,
          log_fn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the trainer on ``nodes`` x processes through the backend; returns the final weights' URI, the
    MLflow run id and the run's last metrics. Fails (TrainingFailed) unless the job succeeded and the final
    weights are completely published."""
    from flowgrpo.tracking import _client, resolve_tracking_uri

    nproc = procs_per_node(procs, gpus_per_node)
    uri = resolve_tracking_uri(tracking_uri)
    work = (str(storage.join(run_root(storage_root, run_id), "work")) if backend == "local"
            else "/tmp/flowgrpo/run")  # pods: scratch only; checkpoints and weights go to storage
    cfg, config_uri = prepare_training(run_id=run_id, preset=preset, reward_weights=reward_weights, epochs=epochs,
                                       overrides=overrides, model_uri=model_uri, reward_endpoints=reward_endpoints,
                                       storage_root=storage_root, world_size=nodes * nproc, tracking_uri=uri,
                                       experiment=experiment, work_dir=work)
    mlflow_run_id = _mlflow_run(uri, experiment, run_id, cfg.tracking.run_name)
    job = TrainJobSpec(name=dns_name(f"fgrpo-{run_id}", 50), config_uri=config_uri, nodes=nodes,
                       procs_per_node=nproc, env={"MLFLOW_RUN_ID": mlflow_run_id, "MLFLOW_TRACKING_URI": uri,
                                                  "KFP_RUN_ID": run_id},
                       env_from_secrets=list(secrets or []), timeout_s=timeout_s, image=image,
                       gpus_per_node=gpus_per_node, tolerations=list(tolerations or []),
                       node_selector=dict(node_selector or {}))
    t0 = time.monotonic()
    result = backend_for(backend, namespace).train(run_id, job, log_fn)
    final_uri = cfg.storage.final_uri
    storage.verify(final_uri, deep=False)  # Succeeded is not enough: the weights must be there
    metrics = {k: float(v) for k, v in _client(uri).get_run(mlflow_run_id).data.metrics.items() if math.isfinite(v)}
    return {"final_uri": final_uri, "mlflow_run_id": mlflow_run_id, "tracking_uri": uri, "metrics": metrics,
            "config_uri": config_uri, "job": result.get("job", job.name), "wall_s": time.monotonic() - t0}


# ------------------------------------------------------------------------------------------ evaluation
def evaluate(*, model_uri: str, base_model_uri: str, preset: str, reward_weights: str = "", overrides: str = "",
             suites: str = "preset", data_root: str = "", gate_metric: str = "", gate_min_improvement: float = 0.0,
             tracking_uri: str = "", mlflow_run_id: str = "", champion_model_uri: str = "", cache_dir: str = "",
             work_dir: str = "", images_per_prompt: int = 0, num_prompts: int = -1,
             reward_options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Evaluate the trained model, its base (and the champion, when given) on the same prompts and seeds
    (:func:`flowgrpo.eval.run_eval`); ``passed`` when candidate[gate_metric] - base[gate_metric] >=
    gate_min_improvement (default gate metric: the first suite's primary metric, e.g. ``preset/avg``,
    ``geneval/overall``). Logs metrics, reports and per-image records to the training's MLflow run.

    ``cache_dir``: evaluation cache root (default ``$FLOWGRPO_EVAL_CACHE``, else ``$FLOWGRPO_HOME/eval-cache``):
    the base and champion evaluations are computed once per (model, suite, settings). ``work_dir``: where the
    per-image results accumulate (default ``$FLOWGRPO_HOME/eval-runs/<digest of the arguments>``, so a retried
    task resumes); removed after success. ``num_prompts`` -1 = the preset's ``eval.num_prompts``."""
    import shutil

    from flowgrpo.eval import EvalSettings, build_suite, run_eval
    from flowgrpo.eval.mlflow_log import log_eval_run
    from flowgrpo.tracking import state_dir

    cfg = build_run_config(preset, reward_weights, 0, overrides, world_size=None)
    names = parse_suites(suites)
    settings = EvalSettings.from_config(cfg)
    if num_prompts >= 0:
        settings.num_prompts = num_prompts
    settings.images_per_prompt = images_per_prompt
    if str(cfg.model.path).startswith("tiny") and settings.device_type() == "cpu":
        settings.threads = 1  # the tiny demo model: one thread is faster (its ops are too small to split)
    suite_objs = [build_suite(n, cfg, data_root or None, num_prompts=settings.num_prompts,
                              images_per_prompt=settings.images_per_prompt, seed=settings.seed,
                              reward_options=reward_options) for n in names]
    own_work = not work_dir
    if own_work:
        digest = hashlib.sha256(json.dumps([model_uri, base_model_uri, champion_model_uri, preset, reward_weights,
                                            overrides, names, data_root, settings.num_prompts,
                                            settings.images_per_prompt], default=str).encode()).hexdigest()[:20]
        work_dir = str(state_dir() / "eval-runs" / digest)
    run = run_eval(model_uri, suite_objs, settings, work_dir, base=base_model_uri or None,
                   champion=champion_model_uri or None, family=cfg.model.family, cache_dir=cache_dir or None,
                   gate_metric=gate_metric, gate_min_improvement=gate_min_improvement,
                   restart=own_work)  # our own directory: results of other settings are stale, not precious
    if mlflow_run_id:
        log_eval_run(run, mlflow_run_id, tracking_uri or None)
    passed = bool(run.passed) if run.passed is not None else True  # no base: nothing to gate on
    out = {"passed": passed, "candidate": run.candidate, "base": run.base, "champion": run.champion,
           "gate": run.gate, "gate_metric": run.gate_metric,
           "delta": run.delta if run.delta is not None else float("nan"), "markdown": run.markdown,
           "html": run.html, "seconds": sum(r.seconds for rs in run.results.values() for r in rs),
           "skipped": run.skipped(), "cache": {role: {r.suite: r.stats.get("cache") for r in rs}
                                               for role, rs in run.results.items()},
           "work_dir": work_dir}
    if own_work:
        shutil.rmtree(work_dir, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------ registry
def register(*, model_name: str, final_uri: str, mlflow_run_id: str, run_id: str, metrics: dict[str, float],
             promotion_rule: str = "", tracking_uri: str = "") -> dict[str, Any]:
    """Register the candidate (idempotent per KFP run; alias ``candidate``), then apply the promotion rule
    (alias ``champion``) when one is given."""
    from flowgrpo import registry
    from flowgrpo.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    gate = parse_gate(promotion_rule)
    version = registry.register(model_name, final_uri, mlflow_run_id or None, kfp_run_id=run_id, metrics=metrics,
                                tracking_uri=uri)
    out: dict[str, Any] = {"model": model_name, "version": version, "alias": registry.CANDIDATE,
                           "tracking_uri": uri, "promoted": False, "reasons": []}
    if gate is not None:
        res = registry.promote(model_name, version, gate, tracking_uri=uri)
        out.update(promoted=res.promoted, reasons=res.reasons, champion=res.champion)
    return out


def candidate_metrics(metadata: dict[str, Any]) -> dict[str, float]:
    """The candidate's metrics from the evaluate step's Metrics artifact (``base/...`` entries dropped)."""
    return {k: float(v) for k, v in metadata.items() if not k.startswith("base/") and isinstance(v, (int, float))}


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


__all__ = ["backend_for", "deploy_rewards", "dumps", "evaluate", "fetch_model", "prepare_training", "register",
           "reward_server_specs", "run_root", "teardown", "train"]


def resolve_version(model_name: str, version: str, tracking_uri: str = "") -> dict[str, str]:
    """A version number or alias of ``model_name`` -> {version, source, run_id}."""
    from flowgrpo import registry
    from flowgrpo.tracking import resolve_tracking_uri

    c = registry.client(resolve_tracking_uri(tracking_uri))
    mv = c.get_model_version(model_name, version) if str(version).isdigit() else \
        c.get_model_version_by_alias(model_name, version)
    return {"version": str(mv.version), "source": mv.source, "run_id": mv.run_id or ""}


def record_eval(model_name: str, version: str, metrics: dict[str, float], tracking_uri: str = "") -> dict[str, str]:
    """Set ``metric.<name>`` tags on a model version (what :class:`flowgrpo.registry.Gate` compares)."""
    from flowgrpo import registry
    from flowgrpo.tracking import resolve_tracking_uri

    c = registry.client(resolve_tracking_uri(tracking_uri))
    tags = {f"{registry.METRIC_PREFIX}{k}": repr(float(v)) for k, v in metrics.items()}
    for k, v in tags.items():
        c.set_model_version_tag(model_name, str(version), k, v)
    return tags
