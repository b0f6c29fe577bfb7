"""Benchmarks behind ``flowgrpo bench rollout|train|reward-server``: one JSON-serialisable dict per run (the CLI
prints one line).

* ``rollout``: images/s of encode + SDE sampling + decode, FLOPs/MFU, transformer calls per step, and a plain
  diffusers ``StableDiffusion3Pipeline`` measured in the same process (``speedup_vs_baseline``).
* ``train``: one training timestep exactly as ``GRPORecipe.step_loss`` (+ backward, grad clip, AdamW), its MFU,
  and the measured update loop over the trained steps (full: int(0.99 T); ``--window``: the window).
* ``reward-server``: reward throughput through the HTTP reward server vs in-process (:mod:`.reward_server`).
* ``eval``: images/s of the eval sampler and the share of eval time spent scoring (:mod:`flowgrpo.eval.bench`).
* ``shapes``: held-out shapes-world score before / after a CPU budget of Flow-GRPO (:mod:`.shapes`).
* ``dag``: the local pipeline DAG's overhead (everything but the train task) on the demo preset (:mod:`.dag`).
"""

from __future__ import annotations

from typing import Any

from flowgrpo.bench.flops import count_flops, flop_counter, measure_matmul_peak


def run_bench(args: Any) -> dict[str, Any]:
    """Dispatch on ``args.what`` (rollout, train, reward-server, eval, shapes, dag); ``args`` is the CLI namespace."""
    import torch

    if args.what == "reward-server":
        from flowgrpo.bench.reward_server import run

        return run(args)
    if args.what == "eval":
        from flowgrpo.eval.bench import run as run_eval_bench

        return run_eval_bench(args)
    if args.what == "shapes":
        from flowgrpo.bench.shapes import run as run_shapes

        return run_shapes(args)
    if args.what == "dag":
        from flowgrpo.bench.dag import run as run_dag

        return run_dag(args)
    if args.what not in ("rollout", "train"):
        raise ValueError(f"unknown benchmark {args.what!r}: expected 'rollout', 'train' or 'reward-server'")
    threads = torch.get_num_threads()
    try:
        if args.what == "rollout":
            from flowgrpo.bench.rollout import bench_rollout

            return bench_rollout(args)
        from flowgrpo.bench.train import bench_train

        return bench_train(args)
    finally:
        torch.set_num_threads(threads)  # --threads is for this run only


__all__ = ["count_flops", "flop_counter", "measure_matmul_peak", "run_bench"]
