"""The Kubeflow pipeline's library side: argument validation (params), the steps the components call
(steps), compile / local runs (local_run), and the KFP API operations (kfp_client)."""
