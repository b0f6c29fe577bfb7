"""The Kubernetes side of the ``kubernetes`` backend, through the official ``kubernetes`` client only.

``objects`` builds the run's objects as plain dicts, ``validate`` checks them offline (``ManifestError``),
``rewards`` deploys the reward servers and tears a run down by label, ``pytorchjob`` launches and watches
the training, and ``client`` finds the cluster. :class:`flowgrpo.backends.kubernetes.KubernetesBackend`
ties them together.
"""
