"""Container images of the pipeline, in one place. Tags follow the package version; CI pins digests by
rewriting these strings before compiling (the compiled YAML is committed, so it must be deterministic)."""

REGISTRY = "ghcr.io/flowgrpo"
VERSION = "0.1.0"

#: light steps (fetch, deploy, launch, register, teardown): flowgrpo + kfp + kubernetes client, no CUDA
COMPONENT_IMAGE = f"{REGISTRY}/flowgrpo-components:{VERSION}"
#: trainer (torch + CUDA + DeepSpeed), run by the PyTorchJob, also the evaluate step (needs a GPU)
TRAINER_IMAGE = f"{REGISTRY}/flowgrpo-trainer:{VERSION}"
#: reward servers (reward models + HTTP server)
REWARD_IMAGE = f"{REGISTRY}/flowgrpo-reward-server:{VERSION}"
