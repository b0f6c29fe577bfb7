from typing import NamedTuple

from kfp import dsl

from components.images import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def register(model_name: str, final_uri: str, mlflow_run_id: str, run_id: str, eval_metrics: dsl.Input[dsl.Metrics],
             promotion_rule: str, tracking_uri: str,
             info: dsl.Output[dsl.Markdown]) -> NamedTuple("RegisterOutputs", [("version", str), ("promoted", bool)]):
    """Register the model version (idempotent per KFP run) with alias `candidate`; with a promotion rule,
    move `champion` when the rule passes against the current champion."""
    import collections

    from flowgrpo.pipeline import steps

    res = steps.register(model_name=model_name, final_uri=final_uri, mlflow_run_id=mlflow_run_id, run_id=run_id,
                         metrics=steps.candidate_metrics(eval_metrics.metadata), promotion_rule=promotion_rule,
                         tracking_uri=tracking_uri)
    text = (f"# Registered\n\n- model: `{res['model']}` version **{res['version']}** (alias `{res['alias']}`)\n"
            f"- promoted to champion: {res['promoted']}" + "".join(f"\n  - {r}" for r in res["reasons"]) + "\n")
    with open(info.path, "w") as f:
        f.write(text)
    print(steps.dumps(res))
    return collections.namedtuple("RegisterOutputs", ["version", "promoted"])(res["version"], res["promoted"])
