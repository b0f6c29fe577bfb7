"""KFP v2 lightweight components of the Flow-GRPO pipeline: one module each, typed inputs and outputs, the
logic in :mod:`flowgrpo.pipeline.steps`. They run in the images of ``images/`` (``install_kfp_package=False``:
the image ships kfp and flowgrpo; nothing is pip-installed at run time)."""
