"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-format tiny SD3 directory (spec "tiny", seed 0), built once per test session."""
    from flowgrpo.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto's S3 server on 127.0.0.1 (one per test session): ``http://127.0.0.1:<port>``."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch) -> str:
    """A fresh bucket on :func:`moto_endpoint`, with the AWS environment (endpoint, fake keys, no profiles) pointed
    at it for this test. Returns the bucket name."""
    import uuid

    import boto3

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    for var, value in {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "AKIAFLOWGRPOTEST",
                       "AWS_SECRET_ACCESS_KEY": "fake-secret", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                       "NO_PROXY": "127.0.0.1,localhost"}.items():
        monkeypatch.setenv(var, value)
    name = f"test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name
