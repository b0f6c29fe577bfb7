"""``flowgrpo`` command line.

  flowgrpo train --config configs/tiny_cpu.yaml output_dir=DIR train.epochs=3 [--resume auto|never|PATH]
  flowgrpo validate --config configs/geneval_sd3.yaml [--world-size 32] [key=value ...]
  flowgrpo make-tiny-model DIR [--spec tiny|bench_cpu]
  flowgrpo pretrain-shapes DIR [--preset default|small] [--seed 0] [--budget-s 900]
  flowgrpo make-edit-sources PROMPTS.jsonl IMAGE_ROOT --model T2I_MODEL [--family sd3] [--resolution 512]
  flowgrpo bench shapes [--cpu-budget-s 600] [--variants flowgrpo,fast_nocfg] [--guard]
  flowgrpo bench rollout|train [--model DIR] [--batch 8] [--steps 10] [--resolution 128] [--guidance 4.5]
  flowgrpo registry show|promote|rollback|register --model NAME [--version V] [--gate GATE.yaml] [--tracking-uri URI]
  flowgrpo mlflow-ui [--port 5000] [--print-only]
  flowgrpo eval --model URI --suite geneval|drawbench|ocr|pickscore|shapes|preset[,..] [--base URI] [--out DIR]
  flowgrpo pipeline run --local | compile [--check] | upload | submit | schedule   (see flowgrpo.pipeline.cli)
"""

from __future__ import annotations

import argparse
import json
import sys

from flowgrpo.config import ConfigError, load_config


def _cmd_train(args: argparse.Namespace) -> int:
    from flowgrpo.distributed import read_env

    cfg = load_config(args.config, args.overrides)
    cfg.check_world_size(read_env().world_size)  # fail before importing any model code
    from flowgrpo.recipe import run_training

    result = run_training(cfg, resume=args.resume)
    print(json.dumps({"output_dir": cfg.output_dir, **{k: v for k, v in result.items() if not isinstance(v, dict)}},
                     default=str))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    cfg.check_world_size(args.world_size)
    print(f"ok: {args.config or 'defaults'} (world size {args.world_size})")
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from flowgrpo.models.tiny import make_tiny_model

    print(make_tiny_model(args.out_dir, spec_name=args.spec, seed=args.seed))
    return 0


def _cmd_pretrain_shapes(args: argparse.Namespace) -> int:
    from flowgrpo.models.pretrain import cli_pretrain_shapes

    return cli_pretrain_shapes(args)


def _cmd_make_edit_sources(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from flowgrpo.edit import generate_sources
    from flowgrpo.eval.runner import EvalSettings, Sampler
    from flowgrpo.prompts import load_prompts

    prompts = load_prompts(args.prompts)  # before any model is loaded: a bad file fails first
    settings = EvalSettings(num_steps=args.steps, guidance_scale=args.guidance, resolution=args.resolution,
                            device=args.device, mixed_precision=args.mixed_precision,
                            max_sequence_length=args.max_sequence_length)
    sampler = Sampler.load(args.model, settings, family=args.family)
    bar = tqdm(total=0, desc="sources", unit="img")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    written = generate_sources(prompts, args.image_root, sampler, seed=args.seed, batch_size=args.batch,
                               overwrite=args.overwrite, progress=progress)
    bar.close()
    print(json.dumps({"image_root": args.image_root, "written": len(written), "rows": len(prompts)}))
    return 0


def _cmd_serve_reward(args: argparse.Namespace) -> int:
    from flowgrpo.rewards.server import serve

    return serve(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from flowgrpo.bench import run_bench

    print(json.dumps(run_bench(args)))
    return 0


def _cmd_registry(args: argparse.Namespace) -> int:
    from flowgrpo import registry as reg
    from flowgrpo.tracking import TrackingUnavailableError

    uri = args.tracking_uri
    try:
        if args.action == "show":
            info = reg.show(args.model, tracking_uri=uri)
            print(json.dumps(info, indent=1) if args.json else reg.format_show(info))
            return 0
        if args.action == "promote":
            if not args.version or not args.gate:
                print("flowgrpo registry promote: --version and --gate are required", file=sys.stderr)
                return 2
            res = reg.promote(args.model, args.version, reg.Gate.from_yaml(args.gate), tracking_uri=uri,
                              dry_run=args.dry_run)
            print(json.dumps(res.to_dict(), indent=1))
            return 0 if res.promoted else 1
        if args.action == "rollback":
            print(json.dumps(reg.rollback(args.model, tracking_uri=uri)))
            return 0
        # register
        if not args.source:
            print("flowgrpo registry register: --source is required", file=sys.stderr)
            return 2
        metrics = {}
        for item in args.metric or []:
            k, _, v = item.partition("=")
            metrics[k] = float(v)
        tags = dict(t.partition("=")[::2] for t in args.tag or [])
        version = reg.register(args.model, args.source, args.run_id, kfp_run_id=args.kfp_run_id, metrics=metrics,
                               tags=tags, tracking_uri=uri)
        print(json.dumps({"model": args.model, "version": version}))
        return 0
    except (reg.RegistryError, reg.GateError, TrackingUnavailableError, ValueError) as e:
        print(f"flowgrpo registry {args.action}: {e}", file=sys.stderr)
        return 2


def _cmd_mlflow_ui(args: argparse.Namespace) -> int:
    """``mlflow ui`` on the embedded store (or --tracking-uri / $MLFLOW_TRACKING_URI when it is a DB)."""
    import os
    import shlex

    from flowgrpo.tracking import _prepare_store, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith(("http://", "https://")):
        print(f"tracking goes to a server: open {uri}")
        return 0
    _prepare_store(uri)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port)]
    print(shlex.join(cmd), flush=True)
    if args.print_only:
        return 0
    os.execv(sys.executable, cmd)
    return 0  # pragma: no cover - execv does not return


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowgrpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="run the Flow-GRPO recipe")
    t.add_argument("--config", help="YAML preset (configs/*.yaml)")
    t.add_argument("--resume", default="auto", help="auto (newest complete checkpoint), never, or a checkpoint dir")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=3")
    t.set_defaults(fn=_cmd_train)

    v = sub.add_parser("validate", help="load and validate a config without building anything")
    v.add_argument("--config")
    v.add_argument("--world-size", type=int, default=1)
    v.add_argument("overrides", nargs="*")
    v.set_defaults(fn=_cmd_validate)

    m = sub.add_parser("make-tiny-model", help="write an offline tiny diffusers SD3 pipeline")
    m.add_argument("out_dir")
    m.add_argument("--spec", default="tiny", help="tiny | bench_cpu")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(fn=_cmd_make_tiny)

    ps = sub.add_parser("pretrain-shapes", help="pretrain the offline shapes-world SD3 base model (flow matching)")
    ps.add_argument("out_dir")
    ps.add_argument("--preset", default="default", help="settings preset: default | small (flowgrpo.models.pretrain)")
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--steps", type=int, default=None, help="flow-matching steps (default: the preset's)")
    ps.add_argument("--resolution", type=int, default=None, help="pixels (default: the preset's, 64)")
    ps.add_argument("--budget-s", dest="budget_s", type=float, default=900.0,
                    help="wall-time cap for both stages (<= 0: none; a capped run is marked stopped_early)")
    ps.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ps.set_defaults(fn=_cmd_pretrain_shapes)

    es = sub.add_parser("make-edit-sources", help="generate the missing source images of an edit prompt set from "
                        "its rows' t2i_prompt with a text-to-image model (deterministic ODE sampling)")
    es.add_argument("prompts", help="edit prompt .jsonl (rows with 'image' and 't2i_prompt')")
    es.add_argument("image_root", help="folder the rows' relative image paths are written under")
    es.add_argument("--model", required=True, help="text-to-image model: local dir, s3://, hub id, tiny, shapes")
    es.add_argument("--family", default="sd3", help="its model family (default sd3)")
    es.add_argument("--resolution", type=int, default=512)
    es.add_argument("--steps", type=int, default=28)
    es.add_argument("--guidance", type=float, default=4.5)
    es.add_argument("--seed", type=int, default=0)
    es.add_argument("--batch", type=int, default=8)
    es.add_argument("--device", default="auto")
    es.add_argument("--mixed-precision", dest="mixed_precision", default="no")
    es.add_argument("--max-sequence-length", dest="max_sequence_length", type=int, default=128)
    es.add_argument("--overwrite", action="store_true", help="regenerate images that exist")
    es.set_defaults(fn=_cmd_make_edit_sources)

    s = sub.add_parser("serve-reward", help="serve rewards over HTTP (POST /v1/score, /healthz, /readyz, /metrics)")
    s.add_argument("--reward", action="append", required=True, metavar="NAME", help="repeat for several rewards")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key-file", default=None, help="else the FLOWGRPO_REWARD_API_KEY environment variable")
    s.add_argument("--insecure-no-auth", action="store_true", help="serve without an API key (local use only)")
    s.add_argument("--max-batch", type=int, default=32)
    s.add_argument("--max-wait-ms", type=float, default=5.0)
    s.add_argument("--max-request-mb", type=float, default=128.0)
    s.add_argument("--max-images-per-request", type=int, default=256)
    s.add_argument("--max-queue-images", type=int, default=4096)
    s.add_argument("--reward-options", default=None, help="JSON, or a .json/.yaml file: {name: {option: value}}")
    s.add_argument("--log-level", default="info")
    s.set_defaults(fn=_cmd_serve_reward)

    b = sub.add_parser("bench", help="benchmarks printing one JSON line")
    b.add_argument("what", choices=["rollout", "train", "reward-server", "dag", "eval", "shapes"])
    b.add_argument("--model", default="tiny:bench_cpu", help="diffusers SD3 dir, or tiny:<spec>")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--resolution", type=int, default=128)
    b.add_argument("--guidance", type=float, default=4.5)
    b.add_argument("--window", type=int, default=0, help="train bench: SDE window size (0 = full, 9 steps)")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--full", action="store_true", help="train bench: full fine-tune instead of LoRA r32/a64")
    b.add_argument("--beta", type=float, default=0.0, help="train bench: KL coefficient (> 0 adds the reference forward)")
    b.add_argument("--compile", action="store_true",
                   help="the recipe's model.compile=true: the transformer compiled in place (compile time in compile_s)")
    b.add_argument("--no-malloc-tune", dest="malloc_tune", action="store_false",
                   help="leave glibc malloc alone (the recipe's malloc_tune=false; default: tuned, as on CPU training)")
    b.add_argument("--threads", type=int, default=0, help="torch threads for this run (0 = torch default)")
    b.add_argument("--no-baseline", dest="no_baseline", action="store_true", help="rollout bench: skip the diffusers run")
    b.add_argument("--rewards", default="jpeg_compressibility,ocr", help="reward-server bench: rewards to compare")
    b.add_argument("--batch-sizes", default="1,8,32", help="reward-server bench: request batch sizes")
    b.add_argument("--clients", type=int, default=4, help="reward-server bench: concurrent clients")
    b.add_argument("--min-seconds", type=float, default=2.0, help="reward-server bench: time per measurement")
    b.add_argument("--max-wait-ms", type=float, default=2.0, help="reward-server bench: server batching wait")
    b.add_argument("--preset", default="shapes_cpu", help="dag bench: the preset the local pipeline trains (the demo's)")
    b.add_argument("--epochs", type=int, default=0, help="dag bench: epochs (0 = the preset's)")
    b.add_argument("--num-prompts", dest="num_prompts", type=int, default=0, help="eval bench: prompts (0 = default)")
    b.add_argument("--device", default="auto", help="eval bench: cpu | cuda | auto")
    b.add_argument("--variants", default="flowgrpo,fast_nocfg", help="shapes bench: flowgrpo, fast_nocfg, guard")
    b.add_argument("--guard", action="store_true", help="shapes bench: also run GRPO-Guard")
    b.add_argument("--cpu-budget-s", dest="cpu_budget_s", type=float, default=600.0,
                   help="shapes bench: CPU seconds of training per variant")
    b.add_argument("--eval-points", dest="eval_points", type=int, default=3, help="shapes bench: evals along the budget")
    b.add_argument("--n-per-tag", dest="n_per_tag", type=int, default=16, help="shapes bench: held-out prompts per tag")
    b.add_argument("--seeds", type=int, default=2, help="shapes bench: samples per held-out prompt")
    b.add_argument("--eval-prompts", dest="eval_prompts", default=None,
                   help="shapes bench: evaluate this .jsonl of shapes-world rows (per-prompt accuracies too) "
                        "instead of --n-per-tag test-split prompts")
    b.add_argument("--out-dir", dest="out_dir", default=None, help="shapes bench: where runs go (default: a temp dir)")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="shapes bench: config override on configs/shapes_cpu.yaml (repeatable)")
    b.set_defaults(fn=_cmd_bench)

    r = sub.add_parser("registry", help="MLflow model registry: show, gated promote, rollback, register")
    r.add_argument("action", choices=["show", "promote", "rollback", "register"])
    r.add_argument("--model", required=True, help="registered model name")
    r.add_argument("--version", help="promote: the version to promote")
    r.add_argument("--gate", help="promote: YAML gate (metric, min_improvement, guards; see flowgrpo.registry)")
    r.add_argument("--dry-run", action="store_true", help="promote: evaluate the gate, move nothing")
    r.add_argument("--tracking-uri", default=None, help="else $MLFLOW_TRACKING_URI, else the embedded store")
    r.add_argument("--json", action="store_true", help="show: JSON instead of text")
    r.add_argument("--source", help="register: storage URI of the final weights")
    r.add_argument("--run-id", default=None, help="register: the training's MLflow run (mlflow_run.json)")
    r.add_argument("--kfp-run-id", default=None, help="register: idempotency key (default: the run's kfp.run_id)")
    r.add_argument("--metric", action="append", metavar="NAME=VALUE", help="register: eval metric (repeat)")
    r.add_argument("--tag", action="append", metavar="KEY=VALUE", help="register: extra version tag (repeat)")
    r.set_defaults(fn=_cmd_registry)

    u = sub.add_parser("mlflow-ui", help="run `mlflow ui` on the embedded tracking store")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--tracking-uri", default=None, help="a sqlite:// or DB URI (default: the embedded store)")
    u.add_argument("--print-only", action="store_true", help="print the command instead of running it")
    u.set_defaults(fn=_cmd_mlflow_ui)

    from flowgrpo.eval.cli import add_parser as add_eval_parser
    from flowgrpo.pipeline.cli import add_parser as add_pipeline_parser

    add_eval_parser(sub)
    add_pipeline_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # key=value overrides may come after --options
    if extra:
        if not hasattr(args, "overrides") or not all("=" in e and not e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"flowgrpo: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # MLflow / KFP unreachable or refusing: one clear line, no traceback
        from flowgrpo.pipeline.kfp_client import PipelineClientError
        from flowgrpo.tracking import TrackingUnavailableError

        if isinstance(e, PipelineClientError):
            print(f"flowgrpo: {e}", file=sys.stderr)
            return 2
        if not isinstance(e, TrackingUnavailableError):
            raise
        print(f"flowgrpo: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
