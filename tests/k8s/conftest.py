"""Fixtures of the k8s tests: a fake API server per test, a client pointing at it, and typical specs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes import client

from flowgrpo.backends.base import RewardServerSpec, TrainJobSpec
from tests.k8s.fake_apiserver import FakeKube

NAMESPACE = "team-a"
RUN_ID = "3f2a9c1e-7b2d-4c55-9a0e-1d2c3b4a5f60"


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    fake = FakeKube().start()
    yield fake
    fake.stop()


@pytest.fixture
def api(kube: FakeKube) -> Iterator[client.ApiClient]:
    api_client = kube.api_client()
    yield api_client
    api_client.close()


@pytest.fixture
def reward_specs() -> list[RewardServerSpec]:
    return [
        RewardServerSpec(name="ocr", rewards=["ocr"], image="registry.example/flowgrpo-reward:1", gpus=1,
                         api_key_secret="reward-key",
                         tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                         node_selector={"nvidia.com/gpu.product": "NVIDIA-L4"}),
        RewardServerSpec(name="cheap", rewards=["jpeg_compressibility", "aesthetic"], port=8080,
                         image="registry.example/flowgrpo-reward:1", cpu="1", memory="2Gi",
                         reward_options={"aesthetic": {"batch": 4}}),
    ]


@pytest.fixture
def train_job() -> TrainJobSpec:
    return TrainJobSpec(name="fgrpo-3f2a9c1e", config_uri="s3://runs/3f2a9c1e/config.yaml", nodes=1,
                        image="registry.example/flowgrpo-trainer:1", env={"MLFLOW_RUN_ID": "abc"},
                        env_from_secrets=["s3-credentials"], timeout_s=30)
