from typing import NamedTuple

from kfp import dsl

from components.images import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def resolve_version(model_name: str, version: str, tracking_uri: str
                    ) -> NamedTuple("VersionOutputs", [("version", str), ("source", str), ("run_id", str)]):
    """A registered model version (a number, or an alias such as champion) -> its version, weights URI and run."""
    import collections

    from flowgrpo.pipeline import steps

    res = steps.resolve_version(model_name, version, tracking_uri)
    print(steps.dumps(res))
    return collections.namedtuple("VersionOutputs", ["version", "source", "run_id"])(
        res["version"], res["source"], res["run_id"])
