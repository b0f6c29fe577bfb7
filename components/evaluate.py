from kfp import dsl

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def evaluate(model_uri: str, base_model_uri: str, preset: str, reward_weights: str, overrides: str,
             eval_suites: str, eval_data_root: str, gate_metric: str, gate_min_improvement: float,
             tracking_uri: str, mlflow_run_id: str, metrics: dsl.Output[dsl.Metrics], report: dsl.Output[dsl.HTML],
             summary: dsl.Output[dsl.Markdown]) -> bool:
    """Evaluate the trained model and its base on the same prompts and seeds. Returns whether the gate
    passed (the pipeline's dsl.If reads it); `metrics` holds the candidate's metrics and base/<name>."""
    from flowgrpo.pipeline import steps

    res = steps.evaluate(model_uri=model_uri, base_model_uri=base_model_uri, preset=preset,
                         reward_weights=reward_weights, overrides=overrides, suites=eval_suites,
                         data_root=eval_data_root, gate_metric=gate_metric, gate_min_improvement=gate_min_improvement,
                         tracking_uri=tracking_uri, mlflow_run_id=mlflow_run_id)
    for k, v in sorted(res["candidate"].items()):
        metrics.log_metric(k, v)
    for k, v in sorted(res["base"].items()):
        metrics.log_metric(f"base/{k}", v)
    with open(report.path, "w") as f:
        f.write(res["html"])
    with open(summary.path, "w") as f:
        f.write(res["markdown"])
    print(res["markdown"])
    return res["passed"]
