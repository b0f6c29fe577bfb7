from kfp import dsl

from components.images import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def record_eval(model_name: str, version: str, eval_metrics: dsl.Input[dsl.Metrics], tracking_uri: str) -> str:
    """Write evaluation metrics onto a model version as `metric.<name>` tags (what promotion gates read)."""
    from flowgrpo.pipeline import steps

    tags = steps.record_eval(model_name, version, steps.candidate_metrics(eval_metrics.metadata), tracking_uri)
    print(steps.dumps(tags))
    return steps.dumps(tags)
