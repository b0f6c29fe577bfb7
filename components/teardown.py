from kfp import dsl

from components.images import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def teardown(backend: str, run_id: str, namespace: str) -> str:
    """Delete everything the run created (found by its run id: an exit task cannot read other tasks'
    outputs). Safe to run twice: right after training and again from the exit handler."""
    from flowgrpo.pipeline import steps

    deleted = steps.teardown(backend, run_id, namespace)
    print(f"teardown {run_id}: deleted {deleted or 'nothing'}")
    return steps.dumps(deleted)
