from typing import NamedTuple

from kfp import dsl

from components.images import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def train(backend: str, run_id: str, preset: str, reward_weights: str, epochs: int, overrides: str,
          model_uri: str, reward_endpoints: str, storage_root: str, nodes: int, gpus_per_node: int,
          procs_per_node: int, tracking_uri: str, experiment: str, namespace: str, image: str,
          storage_secret: str, reward_api_key_secret: str, tolerations: list, node_selector: dict,
          timeout_hours: float, metrics: dsl.Output[dsl.Metrics], model: dsl.Output[dsl.Model],
          run_info: dsl.Output[dsl.Markdown],
          ) -> NamedTuple("TrainOutputs", [("final_uri", str), ("mlflow_run_id", str)]):
    """Run Flow-GRPO on `nodes` x `procs_per_node` (torchrun locally, a PyTorchJob on Kubernetes) and wait
    for success only: a failed or timed-out job fails this task with the master's last log lines."""
    import collections
    import json

    from flowgrpo.pipeline import steps

    secrets = [s for s in (storage_secret, reward_api_key_secret) if s] if backend == "kubernetes" else []
    res = steps.train(backend=backend, run_id=run_id, preset=preset, reward_weights=reward_weights, epochs=epochs,
                      overrides=overrides, model_uri=model_uri, reward_endpoints=json.loads(reward_endpoints or "{}"),
                      storage_root=storage_root, nodes=nodes, gpus_per_node=gpus_per_node, procs=procs_per_node,
                      tracking_uri=tracking_uri, experiment=experiment, namespace=namespace, image=image,
                      secrets=secrets, tolerations=tolerations, node_selector=node_selector,
                      timeout_s=timeout_hours * 3600)
    for k, v in sorted(res["metrics"].items()):
        metrics.log_metric(k, v)
    model.metadata.update(uri=res["final_uri"], mlflow_run_id=res["mlflow_run_id"])
    with open(model.path, "w") as f:
        json.dump({"uri": res["final_uri"]}, f)
    with open(run_info.path, "w") as f:
        f.write(f"# Training\n\n- MLflow run: `{res['mlflow_run_id']}` on {res['tracking_uri']}\n"
                f"- final weights: `{res['final_uri']}`\n- resolved config: `{res['config_uri']}`\n"
                f"- job: `{res['job']}` ({res['wall_s']:.0f} s)\n")
    return collections.namedtuple("TrainOutputs", ["final_uri", "mlflow_run_id"])(res["final_uri"], res["mlflow_run_id"])
