from kfp import dsl

from components.images import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def deploy_reward(backend: str, run_id: str, preset: str, reward_weights: str, overrides: str, image: str,
                  api_key_secret: str, namespace: str, timeout_s: float) -> str:
    """Start one reward server per reward of the run (local subprocesses, or Deployment + Service labelled
    with the run id) and wait for /readyz; returns the endpoints as JSON {reward: URL}."""
    from flowgrpo.pipeline import steps

    endpoints = steps.deploy_rewards(backend, run_id, preset, reward_weights, overrides, image=image,
                                     api_key_secret=api_key_secret, namespace=namespace, timeout_s=timeout_s)
    print(f"reward endpoints: {endpoints}")
    return steps.dumps(endpoints)
