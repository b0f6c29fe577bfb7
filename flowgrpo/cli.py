"""``flowgrpo`` command line.

  flowgrpo train --config configs/tiny_cpu.yaml output_dir=DIR train.epochs=3 [--resume auto|never|PATH]
  flowgrpo validate --config configs/geneval_sd3.yaml [--world-size 32] [key=value ...]
  flowgrpo make-tiny-model DIR [--spec tiny|bench_cpu]
  flowgrpo bench rollout|train [--model DIR] [--batch 8] [--steps 10] [--resolution 128] [--guidance 4.5]
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


def _cmd_serve_reward(args: argparse.Namespace) -> int:
    from flowgrpo.rewards.server import serve

    return serve(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from flowgrpo.bench import run_bench

    print(json.dumps(run_bench(args)))
    return 0


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
    b.add_argument("what", choices=["rollout", "train", "reward-server"])
    b.add_argument("--model", default="tiny:bench_cpu", help="diffusers SD3 dir, or tiny:<spec>")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--resolution", type=int, default=128)
    b.add_argument("--guidance", type=float, default=4.5)
    b.add_argument("--window", type=int, default=0, help="train bench: SDE window size (0 = full, 9 steps)")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--rewards", default="jpeg_compressibility,ocr", help="reward-server bench: rewards to compare")
    b.add_argument("--batch-sizes", default="1,8,32", help="reward-server bench: request batch sizes")
    b.add_argument("--clients", type=int, default=4, help="reward-server bench: concurrent clients")
    b.add_argument("--min-seconds", type=float, default=2.0, help="reward-server bench: time per measurement")
    b.add_argument("--max-wait-ms", type=float, default=2.0, help="reward-server bench: server batching wait")
    b.set_defaults(fn=_cmd_bench)
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


if __name__ == "__main__":
    sys.exit(main())
