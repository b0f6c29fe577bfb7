"""The Flow-GRPO training pipeline:

    fetch_model ─► deploy_reward ─► train ─► teardown (ignore_upstream_failure)
                                       └──► evaluate ─► [gate: passed] ─► register
    everything inside an ExitHandler whose exit task tears down by run id (backstop on failure/terminate)

Compiled by ``flowgrpo pipeline compile`` into ``pipelines/flow_grpo.yaml`` (committed; a test recompiles
and diffs it). ``backend`` picks where the Kubernetes-facing steps run: ``kubernetes`` (Deployments, a
PyTorchJob) or ``local`` (subprocesses; what ``flowgrpo pipeline run --local`` / ``make demo`` uses).
Secrets are referenced by name only (kfp-kubernetes); their values never pass through parameters.
"""

from kfp import dsl, kubernetes

from components.deploy_reward import deploy_reward
from components.evaluate import evaluate
from components.fetch_model import fetch_model
from components.images import REWARD_IMAGE, TRAINER_IMAGE
from components.register import register
from components.teardown import teardown
from components.train import train

#: The pipeline's parameters and their defaults (the signature below reads them from here; the CLI's
#: validation too). Defaults describe a production run: SD3.5-M on GenEval, 1 node x 8 GPUs.
DEFAULTS: dict = {
    "backend": "kubernetes",
    "base_model": "stabilityai/stable-diffusion-3.5-medium",
    "base_model_revision": "",
    "preset": "geneval_sd3",
    "reward_weights": "",
    "epochs": 0,
    "overrides": "",
    "nodes": 1,
    "gpus_per_node": 8,
    "procs_per_node": 0,
    "eval_suites": "preset",
    "eval_data_root": "",
    "gate_metric": "",
    "gate_min_improvement": 0.0,
    "promotion_rule": "",
    "model_name": "flowgrpo-sd3",
    "storage_root": "s3://flowgrpo",
    "tracking_uri": "http://mlflow.flowgrpo.svc.cluster.local:5000",
    "experiment": "flowgrpo",
    "namespace": "",
    "hf_token_secret": "flowgrpo-hf-token",
    "storage_secret": "flowgrpo-s3",
    "reward_api_key_secret": "flowgrpo-reward-api-key",
    "trainer_image": TRAINER_IMAGE,
    "reward_image": REWARD_IMAGE,
    "tolerations": [],
    "node_selector": {},
    "reward_timeout_s": 1800.0,
    "train_timeout_hours": 48.0,
}
D = DEFAULTS
RUN_ID = dsl.PIPELINE_JOB_ID_PLACEHOLDER  # passed whole (placeholders inside f-strings are not substituted)
#: the storage Secret's keys -> env (AWS_ENDPOINT_URL: MinIO or another S3-compatible store; optional)
STORAGE_ENV = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
               "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL"}


def _storage_secret(task, name) -> None:
    """S3 credentials from the storage Secret (optional: IRSA / workload identity clusters have none)."""
    kubernetes.use_secret_as_env(task, secret_name=name, secret_key_to_env=STORAGE_ENV, optional=True)


@dsl.pipeline(name="flow-grpo", description="Flow-GRPO online RL fine-tuning of a flow-matching text-to-image "
              "model: fetch → reward servers → distributed training → evaluation → gated MLflow registration.")
def flow_grpo(
    backend: str = D["backend"],
    base_model: str = D["base_model"],
    base_model_revision: str = D["base_model_revision"],
    preset: str = D["preset"],
    reward_weights: str = D["reward_weights"],
    epochs: int = D["epochs"],
    overrides: str = D["overrides"],
    nodes: int = D["nodes"],
    gpus_per_node: int = D["gpus_per_node"],
    procs_per_node: int = D["procs_per_node"],
    eval_suites: str = D["eval_suites"],
    eval_data_root: str = D["eval_data_root"],
    gate_metric: str = D["gate_metric"],
    gate_min_improvement: float = D["gate_min_improvement"],
    promotion_rule: str = D["promotion_rule"],
    model_name: str = D["model_name"],
    storage_root: str = D["storage_root"],
    tracking_uri: str = D["tracking_uri"],
    experiment: str = D["experiment"],
    namespace: str = D["namespace"],
    hf_token_secret: str = D["hf_token_secret"],
    storage_secret: str = D["storage_secret"],
    reward_api_key_secret: str = D["reward_api_key_secret"],
    trainer_image: str = D["trainer_image"],
    reward_image: str = D["reward_image"],
    tolerations: list = D["tolerations"],
    node_selector: dict = D["node_selector"],
    reward_timeout_s: float = D["reward_timeout_s"],
    train_timeout_hours: float = D["train_timeout_hours"],
):
    """Flow-GRPO training run.

    Args:
        backend: Where reward servers and training run: kubernetes (Deployments + a PyTorchJob) or local (subprocesses on the pipeline's machine).
        base_model: Base model: a Hugging Face hub id, an s3:// URI, a directory, or tiny for the offline test model.
        base_model_revision: Hub revision to pin (a commit sha); empty = the hub's main (not reproducible).
        preset: Training preset name from configs/ (geneval_sd3, ocr_sd3, pickscore_sd3, *_fast_nocfg, grpo_guard_ocr_sd3, tiny_cpu) or an s3:// YAML.
        reward_weights: Reward weights replacing the preset's, e.g. geneval=1.0,ocr=0.2 (or a JSON object); empty = the preset's.
        epochs: Training epochs; 0 = the preset's.
        overrides: Extra dotted config overrides, space separated, e.g. train.learning_rate=1e-5 sample.group_size=16.
        nodes: Training nodes (PyTorchJob Master + nodes-1 Workers).
        gpus_per_node: GPUs per training node (0 = CPU training).
        procs_per_node: Processes per node; 0 = one per GPU.
        eval_suites: Comma-separated evaluation suites: preset (the preset's held-out prompts and rewards), geneval, drawbench.
        eval_data_root: Directory or mount with the eval prompt sets (geneval/, drawbench/); needed for geneval and drawbench.
        gate_metric: Metric that gates registration (candidate vs base model); empty = <first suite>/avg.
        gate_min_improvement: Register only when candidate - base on gate_metric is at least this.
        promotion_rule: Optional champion promotion rule (YAML/JSON {metric, min_improvement, guards}); empty = register as candidate only.
        model_name: MLflow registered model name.
        storage_root: Where models, checkpoints and final weights go (s3://bucket/prefix; a directory for backend=local).
        tracking_uri: MLflow tracking server URI.
        experiment: MLflow experiment name.
        namespace: Kubernetes namespace of reward servers and the PyTorchJob; empty = the pipeline's own.
        hf_token_secret: Name of the Secret with key HF_TOKEN (gated models such as SD3.5); mounted into fetch_model only.
        storage_secret: Name of the Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for storage_root.
        reward_api_key_secret: Name of the Secret with the reward servers' API key (key FLOWGRPO_REWARD_API_KEY).
        trainer_image: Trainer image run by the PyTorchJob.
        reward_image: Reward-server image.
        tolerations: Kubernetes tolerations (JSON list) for the training pods and the evaluate task.
        node_selector: Kubernetes node selector (JSON object) for the training pods and the evaluate task.
        reward_timeout_s: Seconds to wait for reward servers to become ready.
        train_timeout_hours: Hours before the training job is stopped and the task fails.
    """
    final_teardown = teardown(backend=backend, run_id=RUN_ID, namespace=namespace)
    final_teardown.set_display_name("teardown (exit handler)").set_caching_options(False)
    with dsl.ExitHandler(final_teardown, name="cleanup-on-exit"):
        fetch = fetch_model(source=base_model, revision=base_model_revision, storage_root=storage_root)
        fetch.set_display_name("fetch model").set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2)
        fetch.set_caching_options(True)  # pure: keyed on source + revision + storage root
        kubernetes.use_secret_as_env(fetch, secret_name=hf_token_secret, secret_key_to_env={"HF_TOKEN": "HF_TOKEN"},
                                     optional=True)
        _storage_secret(fetch, storage_secret)

        deploy = deploy_reward(backend=backend, run_id=RUN_ID, preset=preset, reward_weights=reward_weights,
                               overrides=overrides, image=reward_image, api_key_secret=reward_api_key_secret,
                               namespace=namespace, timeout_s=reward_timeout_s)
        deploy.set_display_name("deploy reward servers").set_caching_options(False)

        trained = train(backend=backend, run_id=RUN_ID, preset=preset, reward_weights=reward_weights, epochs=epochs,
                        overrides=overrides, model_uri=fetch.outputs["uri"], reward_endpoints=deploy.output,
                        storage_root=storage_root, nodes=nodes, gpus_per_node=gpus_per_node,
                        procs_per_node=procs_per_node, tracking_uri=tracking_uri, experiment=experiment,
                        namespace=namespace, image=trainer_image, storage_secret=storage_secret,
                        reward_api_key_secret=reward_api_key_secret, tolerations=tolerations,
                        node_selector=node_selector, timeout_hours=train_timeout_hours)
        trained.set_display_name("train (PyTorchJob)").set_caching_options(False)
        _storage_secret(trained, storage_secret)

        after_train = teardown(backend=backend, run_id=RUN_ID, namespace=namespace)
        after_train.set_display_name("teardown reward servers").set_caching_options(False)
        after_train.after(trained).ignore_upstream_failure()

        ev = evaluate(model_uri=trained.outputs["final_uri"], base_model_uri=fetch.outputs["uri"], preset=preset,
                      reward_weights=reward_weights, overrides=overrides, eval_suites=eval_suites,
                      eval_data_root=eval_data_root, gate_metric=gate_metric,
                      gate_min_improvement=gate_min_improvement, tracking_uri=tracking_uri,
                      mlflow_run_id=trained.outputs["mlflow_run_id"])
        ev.set_display_name("evaluate").set_caching_options(False)
        ev.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2)
        ev.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
        ev.set_memory_request("32G").set_cpu_request("4")
        kubernetes.add_toleration_json(ev, tolerations)
        kubernetes.add_node_selector_json(ev, node_selector)
        _storage_secret(ev, storage_secret)

        with dsl.If(ev.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (a KFP condition)
            reg = register(model_name=model_name, final_uri=trained.outputs["final_uri"],
                           mlflow_run_id=trained.outputs["mlflow_run_id"], run_id=RUN_ID,
                           eval_metrics=ev.outputs["metrics"], promotion_rule=promotion_rule,
                           tracking_uri=tracking_uri)
            reg.set_display_name("register").set_caching_options(False)
            reg.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2)
            _storage_secret(reg, storage_secret)
