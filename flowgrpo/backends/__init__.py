"""Where the pipeline's Kubernetes-facing steps run: ``local`` (subprocesses on this machine) or
``kubernetes`` (Deployments, Services and a Kubeflow PyTorchJob). Both take the same specs and give the same
results, so a KFP component only picks one by name (:func:`get_backend`)."""

from flowgrpo.backends.base import (
    BACKENDS,
    Backend,
    BackendError,
    RewardServerSpec,
    TrainingFailed,
    TrainJobSpec,
    get_backend,
)

__all__ = ["BACKENDS", "Backend", "BackendError", "RewardServerSpec", "TrainJobSpec", "TrainingFailed", "get_backend"]
