from typing import NamedTuple

from kfp import dsl

from components.images import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def fetch_model(source: str, revision: str, storage_root: str,
                model: dsl.Output[dsl.Model]) -> NamedTuple("FetchOutputs", [("uri", str), ("sha256", str)]):
    """Publish the base model (hub id + pinned revision, local dir, storage URI, or `tiny`) to storage with
    a sha256 manifest; skipped when a complete copy is already there. HF_TOKEN comes from a Secret."""
    import collections
    import json

    from flowgrpo.pipeline import steps

    res = steps.fetch_model(source, revision, storage_root)
    model.metadata.update(res)
    with open(model.path, "w") as f:  # the artifact is a pointer: the weights stay in storage
        json.dump(res, f)
    return collections.namedtuple("FetchOutputs", ["uri", "sha256"])(res["uri"], res["sha256"])
