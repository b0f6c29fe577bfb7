"""``flowgrpo pipeline run|compile|upload|submit|schedule``.

  flowgrpo pipeline run --local [--preset tiny_cpu] [--arg KEY=VALUE ...]    # the whole DAG here (make demo)
  flowgrpo pipeline compile [--check]                                      # pipelines/*.yaml (committed)
  flowgrpo pipeline upload --host URL                                      # version <pkg version>-<git sha>
  flowgrpo pipeline submit --host URL [--version-id V] --arg KEY=VALUE ...
  flowgrpo pipeline schedule --host URL --cron '0 0 3 * * *' --version-id V [--arg ...]
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from flowgrpo.config import ConfigError
from flowgrpo.pipeline.params import ensure_importable, repo_root, validate_arguments

PIPELINES = {"flow_grpo": "pipelines.flow_grpo:flow_grpo", "evaluate_model": "pipelines.evaluate_model:evaluate_model"}


def _pipeline(name: str):
    ensure_importable()
    import importlib

    mod, _, attr = PIPELINES[name].partition(":")
    return getattr(importlib.import_module(mod), attr)


def package_path(name: str) -> Path:
    return repo_root() / "pipelines" / f"{name}.yaml"


def parse_args_list(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pipeline arguments, typed by the pipeline's defaults (str stays str: '0123' is a
    revision, not a number; lists and dicts are JSON/YAML)."""
    ensure_importable()
    from pipelines.flow_grpo import DEFAULTS

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError("--arg", item, "KEY=VALUE with KEY a pipeline parameter")
        default = DEFAULTS.get(key)
        try:
            if isinstance(default, bool):
                value: Any = raw.lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                value = int(raw)
            elif isinstance(default, float):
                value = float(raw)
            elif isinstance(default, (list, dict)):
                value = yaml.safe_load(raw) if raw.strip() else type(default)()
            else:
                value = raw
        except (ValueError, yaml.YAMLError) as e:
            raise ConfigError(key, raw, f"a value of type {type(default).__name__} ({e})") from None
        out[key] = value
    return out


#: model paths that need no network (built or trained offline into the cache): a local run starts from the
#: preset's own ``model.path`` when it is one of these, else from the random tiny model
OFFLINE_MODELS = ("tiny", "tiny-flux", "tiny-flux-kontext", "tiny-qwen-image", "tiny-qwen-image-edit", "tiny-wan",
                  "shapes")


def offline_base_model(preset: str) -> str:
    """The base model a local run of ``preset`` fetches: the preset's ``model.path`` when it is an offline one
    (``shapes`` for shapes_cpu, ``tiny-flux`` for tiny_flux_cpu, ...), else ``tiny``."""
    import yaml

    from flowgrpo.pipeline.params import resolve_preset

    path = resolve_preset(preset)
    if str(path).startswith("s3:"):
        return "tiny"
    data = yaml.safe_load(path.read_text()) or {}
    model_path = str((data.get("model") or {}).get("path") or "")
    return model_path if model_path.partition(":")[0] in OFFLINE_MODELS else "tiny"


def local_arguments(preset: str, root: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """The embedded default: the preset's offline base model (:func:`offline_base_model`), local reward servers
    and torchrun, local storage, MLflow on the embedded sqlite store."""
    from flowgrpo.tracking import resolve_tracking_uri

    base = offline_base_model(preset)
    args = {"backend": "local", "base_model": base, "preset": preset, "gpus_per_node": 0,
            "storage_root": str(root / "store"), "tracking_uri": resolve_tracking_uri(""),
            "model_name": f"flowgrpo-{base.partition(':')[0]}", "eval_suites": "preset", "namespace": ""}
    args.update(extra)
    return args


def _cmd_run(a: argparse.Namespace) -> int:
    from flowgrpo.pipeline.local_run import PipelineRunFailed, format_timings, run_local

    if not a.local:
        print("flowgrpo pipeline run: only --local runs here; use `flowgrpo pipeline submit --host URL` for a "
              "KFP cluster", file=sys.stderr)
        return 2
    root = Path(a.pipeline_root).resolve()
    args = local_arguments(a.preset, root, parse_args_list(a.arg))
    validate_arguments(args)  # before any task starts
    try:
        result = run_local(_pipeline("flow_grpo"), args, root / "kfp")
    except PipelineRunFailed as e:
        print(format_timings(e.result), file=sys.stderr)
        print(f"flowgrpo pipeline run: {e}", file=sys.stderr)
        return 1
    summary = summarize(result, args)
    (root / "last_run.json").write_text(json.dumps(summary, indent=1, default=str))
    if a.json:
        print(json.dumps(summary, default=str))
        return 0
    print(format_timings(result))
    print(f"MLflow run:          {summary.get('mlflow_run_id')}  ({args['tracking_uri']})")
    if summary.get("version"):
        print(f"registered model:    {args['model_name']} version {summary['version']} "
              f"(aliases: {', '.join(summary.get('aliases', [])) or '-'})")
    else:
        print("registered model:    none (the evaluation gate did not pass; see the evaluate task's report)")
    print(f"final weights:       {summary.get('final_uri')}")
    print(f"KFP local outputs:   {result['run_dir']}")
    print("look at it:          .venv/bin/flowgrpo mlflow-ui   then open http://127.0.0.1:5000")
    return 0


def summarize(result: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """The run's essentials: timings, MLflow run, registered version and its aliases (read back from the
    registry, so the summary shows what is really there)."""
    outs = result["outputs"]
    train, reg, ev = outs.get("train", {}), outs.get("register", {}), outs.get("evaluate", {})
    summary = {k: result[k] for k in ("total_s", "train_s", "overhead_share", "tasks", "run_dir")}
    summary.update(mlflow_run_id=train.get("mlflow_run_id"), final_uri=train.get("final_uri"),
                   eval_passed=ev.get("Output"),
                   version=reg.get("version"), model_name=args["model_name"])
    if reg.get("version"):
        from flowgrpo import registry

        info = registry.show(args["model_name"], tracking_uri=args["tracking_uri"])
        summary["aliases"] = sorted(k for k, v in info.get("aliases", {}).items() if str(v) == str(reg["version"]))
    return summary


def _cmd_compile(a: argparse.Namespace) -> int:
    from kfp import compiler

    stale = []
    for name in PIPELINES:
        target = package_path(name)
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d) / target.name
            compiler.Compiler().compile(_pipeline(name), str(tmp))
            new = tmp.read_text()
        old = target.read_text() if target.is_file() else ""
        if a.check:
            if new != old:
                stale.append(name)
                sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                           str(target), f"{target} (recompiled)", n=1))
            continue
        target.write_text(new)
        print(f"wrote {target}")
    if stale:
        print(f"stale compiled pipelines: {stale}; run `flowgrpo pipeline compile` and commit", file=sys.stderr)
        return 1
    return 0


def _client(a: argparse.Namespace):
    from flowgrpo.pipeline import kfp_client

    return kfp_client.make_client(a.host or os.environ.get("KFP_HOST", ""), namespace=a.namespace,
                                  existing_token=os.environ.get("KFP_TOKEN") or None)


def _cmd_upload(a: argparse.Namespace) -> int:
    import flowgrpo
    from flowgrpo.pipeline import kfp_client

    name = a.pipeline.replace("_", "-")
    version = a.version_name or kfp_client.pipeline_version_name(flowgrpo.__version__, kfp_client.git_sha(repo_root()))
    res = kfp_client.upload(_client(a), str(package_path(a.pipeline)), name, version,
                            description=_pipeline(a.pipeline).description)
    print(json.dumps(res))
    return 0


def _cmd_submit(a: argparse.Namespace) -> int:
    from flowgrpo.pipeline import kfp_client

    args = parse_args_list(a.arg)
    if a.pipeline == "flow_grpo":
        validate_arguments(args)
    pinned = bool(a.version_id)
    run_id = kfp_client.submit(_client(a), experiment=a.experiment, run_name=a.run_name or f"{a.pipeline}-run",
                               arguments=args, package_path=None if pinned else str(package_path(a.pipeline)),
                               pipeline_id=a.pipeline_id, version_id=a.version_id,
                               service_account=a.service_account or None)
    print(json.dumps({"run_id": run_id}))
    return 0


def _cmd_schedule(a: argparse.Namespace) -> int:
    from flowgrpo.pipeline import kfp_client

    kfp_client.validate_cron(a.cron)  # before anything else
    args = parse_args_list(a.arg)
    if a.pipeline == "flow_grpo":
        validate_arguments(args)
    rid = kfp_client.schedule(_client(a), experiment=a.experiment, job_name=a.name, cron=a.cron,
                              pipeline_id=a.pipeline_id, version_id=a.version_id, arguments=args,
                              max_concurrency=a.max_concurrency, service_account=a.service_account or None)
    print(json.dumps({"recurring_run_id": rid}))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="the Kubeflow pipeline: run locally, compile, upload, submit, schedule")
    ps = p.add_subparsers(dest="action", required=True)

    r = ps.add_parser("run", help="run the whole DAG on this machine (kfp.local)")
    r.add_argument("--local", action="store_true", help="required: run with kfp.local and the local backend")
    r.add_argument("--preset", default="tiny_cpu")
    r.add_argument("--pipeline-root", default="runs/pipeline", help="local outputs, storage and reward logs")
    r.add_argument("--arg", action="append", metavar="KEY=VALUE", help="pipeline argument (repeat)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.set_defaults(fn=_cmd_run)

    c = ps.add_parser("compile", help="compile pipelines/*.py into the committed YAML")
    c.add_argument("--check", action="store_true", help="exit 1 (and print the diff) if the YAML is stale")
    c.set_defaults(fn=_cmd_compile)

    def remote(q: argparse.ArgumentParser) -> None:
        q.add_argument("--host", default=None, help="KFP API endpoint (else $KFP_HOST); token from $KFP_TOKEN")
        q.add_argument("--namespace", default=None)
        q.add_argument("--pipeline", default="flow_grpo", choices=sorted(PIPELINES))

    u = ps.add_parser("upload", help="upload the compiled pipeline as version <package version>-<git sha>")
    remote(u)
    u.add_argument("--version-name", default=None)
    u.set_defaults(fn=_cmd_upload)

    for action, fn, helptext in (("submit", _cmd_submit, "start one run"),
                                 ("schedule", _cmd_schedule, "create a recurring run (6-field cron)")):
        q = ps.add_parser(action, help=helptext)
        remote(q)
        q.add_argument("--experiment", default="flowgrpo")
        q.add_argument("--pipeline-id", default=None)
        q.add_argument("--version-id", default=None, help="a pinned uploaded version (else the local package)")
        q.add_argument("--arg", action="append", metavar="KEY=VALUE")
        q.add_argument("--service-account", default="flowgrpo-pipeline-runner")
        if action == "submit":
            q.add_argument("--run-name", default=None)
        else:
            q.add_argument("--cron", required=True, help="6 fields, seconds first: '0 0 3 * * *' = daily 03:00")
            q.add_argument("--name", default="flowgrpo-nightly")
            q.add_argument("--max-concurrency", type=int, default=1)
        q.set_defaults(fn=fn)
