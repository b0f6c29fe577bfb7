"""``flowgrpo eval``: evaluate a model (and its base / the champion) on suites and write a report.

    flowgrpo eval --model URI --suite geneval|drawbench|ocr|pickscore|shapes|preset[,...] [--base URI]
                  [--champion URI] [--preset NAME] [--out DIR] [--num-prompts N] [--images-per-prompt K]
                  [--data-root DIR] [--steps 40] [--guidance G] [--resolution PX] [--batch-size B] [--seed S]
                  [--cache-dir URI | --no-cache] [--restart] [--reward-options JSON|FILE] [--tiny-rewards DIR]
                  [--mlflow [--tracking-uri URI] [--experiment NAME] [--mlflow-run-id ID]] [--json]

Sampling settings default to the preset's (``eval.num_steps``, ``eval.guidance_scale``, ``sample.resolution``,
``eval.batch_size``, model precision / sequence length) when ``--preset`` is given, else to the paper's
evaluation protocol (40 ODE steps, CFG 4.5, 512 px). Results accumulate in ``<out>/<role>/<suite>/`` (re-running
the same command resumes); ``<out>/report.html``, ``report.md`` and ``metrics.json`` are written at the end.
Exit status: 0, or 1 when a gate was asked for (``--gate-metric``) and failed.

Also runnable as ``python -m flowgrpo.eval.cli ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from flowgrpo.eval.suites import SUITES


def _parse_options(text: str | None) -> dict[str, dict[str, Any]]:
    if not text:
        return {}
    p = Path(text)
    if p.suffix in (".json", ".yaml", ".yml") and p.is_file():
        text = p.read_text()
    import yaml

    data = yaml.safe_load(text)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise SystemExit("flowgrpo eval: --reward-options must be a mapping {reward: {option: value}}, "
                         f"got {text!r}")
    return data


def add_arguments(e: argparse.ArgumentParser) -> argparse.ArgumentParser:
    e.add_argument("--model", required=True, help="model to evaluate: diffusers dir, storage URI, hub id, tiny[:spec]")
    e.add_argument("--suite", default="preset",
                   help=f"comma-separated suites from {', '.join(SUITES)} (default preset)")
    e.add_argument("--base", default="", help="base model to compare with (cached per model/suite/settings)")
    e.add_argument("--champion", default="", help="current champion to compare with (cached like the base)")
    e.add_argument("--revision", default=None, help="hub revision of --model")
    e.add_argument("--base-revision", default=None)
    e.add_argument("--champion-revision", default=None)
    e.add_argument("--preset", default="", help="preset (name or YAML) giving the sampling settings and the "
                   "'preset' suite's prompts and rewards")
    e.add_argument("--family", default=None, help="model family (default: the preset's, else sd3)")
    e.add_argument("--out", default="", help="output directory (default runs/eval/<suites>)")
    e.add_argument("--num-prompts", type=int, default=None, help="first N prompts of each suite (0 = all)")
    e.add_argument("--images-per-prompt", type=int, default=0, help="0 = the suite's default (GenEval 4, else 1)")
    e.add_argument("--data-root", default=None, help="directory with the prompt files (geneval/, drawbench/, ocr/, "
                   "pickscore_sfw/); default $FLOWGRPO_EVAL_DATA")
    e.add_argument("--steps", type=int, default=None, help="ODE steps (default: preset eval.num_steps, else 40)")
    e.add_argument("--guidance", type=float, default=None, help="CFG scale (default: preset eval.guidance_scale)")
    e.add_argument("--resolution", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--device", default=None, help="auto | cpu | cuda")
    e.add_argument("--max-sequence-length", type=int, default=None)
    e.add_argument("--thumb-size", type=int, default=None, help="stored thumbnail size (0 = full-size PNG)")
    e.add_argument("--no-overlap", action="store_true", help="score after sampling instead of concurrently")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads while evaluating (0 = torch's default)")
    e.add_argument("--cache-dir", default=None, help="evaluation cache root (default $FLOWGRPO_EVAL_CACHE, else "
                   "$FLOWGRPO_HOME/eval-cache); any storage URI")
    e.add_argument("--no-cache", action="store_true", help="neither read nor write the evaluation cache")
    e.add_argument("--restart", action="store_true", help="discard results of other settings in --out")
    e.add_argument("--reward-options", default=None, help="JSON/YAML (or a .json/.yaml file): {reward: {option: v}}")
    e.add_argument("--drawbench-rewards", default=None, help="comma-separated reward models of the drawbench suite")
    e.add_argument("--tiny-rewards", default=None, metavar="DIR",
                   help="offline: build tiny random reward models in DIR and use them (tests, demos)")
    e.add_argument("--gate-metric", default="", help="gate: candidate - base on this metric (default: the first "
                   "suite's primary metric); with it, a failed gate exits 1")
    e.add_argument("--min-improvement", type=float, default=0.0)
    e.add_argument("--title", default="Flow-GRPO evaluation")
    e.add_argument("--mlflow", action="store_true", help="log metrics and the report to MLflow")
    e.add_argument("--tracking-uri", default=None)
    e.add_argument("--experiment", default="flowgrpo-eval")
    e.add_argument("--mlflow-run-id", default=None, help="log into this run instead of creating one")
    e.add_argument("--json", action="store_true", help="print the JSON summary instead of the Markdown table")
    e.add_argument("--log-level", default="info")
    e.add_argument("overrides", nargs="*", help="dotted key=value overrides of the preset")
    return e


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``eval`` to the ``flowgrpo`` sub-commands."""
    e = sub.add_parser("eval", help="evaluate a model on benchmark suites (resumable, cached base, HTML report)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(e)
    e.set_defaults(fn=cmd_eval)
    return e


def _settings_and_config(args: argparse.Namespace):
    from flowgrpo.eval import EvalSettings

    cfg = None
    if args.preset:
        from flowgrpo.pipeline.params import build_run_config

        cfg = build_run_config(args.preset, "", 0, " ".join(args.overrides or []), world_size=None)
        settings = EvalSettings.from_config(cfg)
    else:
        if args.overrides:
            raise SystemExit("flowgrpo eval: key=value overrides need --preset")
        settings = EvalSettings()
    changes = {"num_steps": args.steps, "guidance_scale": args.guidance, "resolution": args.resolution,
               "batch_size": args.batch_size, "seed": args.seed, "device": args.device,
               "max_sequence_length": args.max_sequence_length, "thumb_size": args.thumb_size,
               "num_prompts": args.num_prompts, "threads": args.threads}
    for k, v in changes.items():
        if v is not None:
            setattr(settings, k, v)
    settings.images_per_prompt = args.images_per_prompt
    if args.no_overlap:
        settings.overlap = False
    return settings, cfg


def cmd_eval(args: argparse.Namespace) -> int:
    from flowgrpo.config import ConfigError
    from flowgrpo.eval import EvalError, SuiteError

    try:
        return _cmd_eval(args)
    except (SuiteError, EvalError, ConfigError) as e:
        print(f"flowgrpo eval: {e}", file=sys.stderr)
        return 2


def _cmd_eval(args: argparse.Namespace) -> int:
    from flowgrpo.eval import build_suite, run_eval
    from flowgrpo.pipeline.params import parse_suites

    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        import transformers

        transformers.logging.set_verbosity_error()  # per-prompt truncation warnings drown the progress lines
    except Exception:  # noqa: BLE001
        pass
    settings, cfg = _settings_and_config(args)
    names = parse_suites(args.suite)
    options = _parse_options(args.reward_options)
    if args.tiny_rewards:
        from flowgrpo.eval.testing import tiny_reward_options

        options = {**tiny_reward_options(args.tiny_rewards), **options}
    drawbench = [r for r in (args.drawbench_rewards or "").split(",") if r] or None
    suites = [build_suite(n, cfg, args.data_root, num_prompts=settings.num_prompts,
                          images_per_prompt=settings.images_per_prompt, seed=settings.seed, reward_options=options,
                          drawbench_rewards=drawbench) for n in names]
    out = args.out or str(Path("runs") / "eval" / "-".join(names))
    family = args.family or (cfg.model.family if cfg is not None else "sd3")
    cache_dir = "" if args.no_cache else args.cache_dir
    run = run_eval(args.model, suites, settings, out, base=args.base or None, champion=args.champion or None,
                   family=family, revision=args.revision, base_revision=args.base_revision,
                   champion_revision=args.champion_revision, cache_dir=cache_dir, gate_metric=args.gate_metric,
                   gate_min_improvement=args.min_improvement, restart=args.restart, title=args.title)
    mlflow_run = None
    if args.mlflow or args.mlflow_run_id:
        from flowgrpo.eval.mlflow_log import end_run, log_eval_run, start_run

        mlflow_run = args.mlflow_run_id or start_run(args.tracking_uri, args.experiment,
                                                     f"eval-{'-'.join(names)}-{time.strftime('%Y%m%d-%H%M%S')}",
                                                     tags={"eval.model": args.model, "eval.base": args.base or "",
                                                           "eval.suites": ",".join(names)})
        log_eval_run(run, mlflow_run, args.tracking_uri)
        if not args.mlflow_run_id:
            end_run(mlflow_run, args.tracking_uri)
    if args.json:
        print(json.dumps({**run.summary(), "out_dir": str(run.out_dir), "mlflow_run_id": mlflow_run}, default=str))
    else:
        print(run.markdown)
        print(f"report: {Path(run.out_dir) / 'report.html'}")
    if args.gate_metric and run.passed is False:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flowgrpo eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return cmd_eval(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
