"""Evaluate an already registered model version (e.g. the champion, on new suites) without training:

    resolve_version ─► evaluate (vs the base model) ─► record_eval (metric.* tags on the version)
"""

from kfp import dsl, kubernetes

from components.evaluate import evaluate
from components.record_eval import record_eval
from components.resolve_version import resolve_version
from pipelines.flow_grpo import DEFAULTS as D
from pipelines.flow_grpo import STORAGE_ENV


@dsl.pipeline(name="flowgrpo-evaluate", description="Evaluate a registered Flow-GRPO model version against its "
              "base model and record the metrics on the version.")
def evaluate_model(
    model_name: str = D["model_name"],
    version: str = "champion",
    base_model_uri: str = "",
    preset: str = D["preset"],
    reward_weights: str = D["reward_weights"],
    overrides: str = D["overrides"],
    eval_suites: str = D["eval_suites"],
    eval_data_root: str = D["eval_data_root"],
    tracking_uri: str = D["tracking_uri"],
    storage_secret: str = D["storage_secret"],
    tolerations: list = D["tolerations"],
    node_selector: dict = D["node_selector"],
):
    """Evaluate a registered model version.

    Args:
        model_name: MLflow registered model name.
        version: Version number or alias (champion, candidate).
        base_model_uri: The base model's storage URI (what fetch_model published) to compare against.
        preset: Preset whose eval settings (steps, CFG, resolution) and rewards are used.
        reward_weights: Reward weights replacing the preset's; empty = the preset's.
        overrides: Extra dotted config overrides.
        eval_suites: Comma-separated suites: preset, geneval, drawbench.
        eval_data_root: Directory or mount with the eval prompt sets.
        tracking_uri: MLflow tracking server URI.
        storage_secret: Name of the Secret with S3 credentials.
        tolerations: Kubernetes tolerations (JSON list) for the evaluate task.
        node_selector: Kubernetes node selector (JSON object) for the evaluate task.
    """
    mv = resolve_version(model_name=model_name, version=version, tracking_uri=tracking_uri)
    mv.set_caching_options(False).set_retry(num_retries=2, backoff_duration="30s")
    ev = evaluate(model_uri=mv.outputs["source"], base_model_uri=base_model_uri, preset=preset,
                  reward_weights=reward_weights, overrides=overrides, eval_suites=eval_suites,
                  eval_data_root=eval_data_root, gate_metric="", gate_min_improvement=-1e30,  # report only: no gate
                  tracking_uri=tracking_uri, mlflow_run_id=mv.outputs["run_id"])
    ev.set_caching_options(False).set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2)
    ev.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    kubernetes.add_toleration_json(ev, tolerations)
    kubernetes.add_node_selector_json(ev, node_selector)
    rec = record_eval(model_name=model_name, version=mv.outputs["version"], eval_metrics=ev.outputs["metrics"],
                      tracking_uri=tracking_uri)
    rec.set_caching_options(False).set_retry(num_retries=3, backoff_duration="30s")
    for t in (mv, ev, rec):
        kubernetes.use_secret_as_env(t, secret_name=storage_secret, secret_key_to_env=STORAGE_ENV, optional=True)
