"""Rollout on the tiny SD3: cost rules (encode once, decode once, one call per step without CFG), the
recorded Trajectory, noise 0 = ODE, determinism per image."""

from __future__ import annotations

import pytest
import torch

from flowgrpo.models import load_adapter
from flowgrpo.rollout import PromptEncoder, rollout, to_uint8
from flowgrpo.schedule import full_window, random_window


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return load_adapter("sd3", str(tiny_model_dir), max_sequence_length=16)


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["hidden_states"].shape[0]),
                                          with_kwargs=True)
    return calls, handle


def _run(adapter, prompts, guidance, window, seeds=None, encoder=None, **kw):
    enc = encoder or PromptEncoder(adapter)
    cond = enc(prompts)
    neg = adapter.encode_prompts([""])
    seeds = seeds or list(range(len(prompts)))
    return rollout(adapter, cond, neg, sigmas=adapter.sigmas(6), window=window, guidance_scale=guidance,
                   noise_level=0.7, sde_type=kw.pop("sde_type", "sde"), sample_seeds=seeds, resolution=64, **kw)


@pytest.mark.parametrize("guidance,rows", [(4.5, 8), (1.0, 4)])
def test_one_transformer_call_per_step(adapter, guidance, rows):
    """CFG: one call per step on the 2B batch [negative; positive]; no CFG: one call on B rows."""
    calls, h = _count_calls(adapter.transformer)
    try:
        _run(adapter, ["a cat"] * 4, guidance, full_window(6))
    finally:
        h.remove()
    assert calls == [rows] * 6


def test_unique_prompts_encoded_once_and_latents_decoded_once(adapter, monkeypatch):
    enc = PromptEncoder(adapter)
    decoded = []
    real_decode = adapter.decode
    monkeypatch.setattr(adapter, "decode", lambda x: decoded.append(x.shape[0]) or real_decode(x))
    _run(adapter, ["a cat", "a dog", "a cat", "a cat"], 4.5, full_window(6), encoder=enc)
    _run(adapter, ["a dog", "a fox", "a dog", "a fox"], 4.5, full_window(6), encoder=enc, seeds=[4, 5, 6, 7])
    assert enc.calls == 3  # cat, dog, fox: each encoded once in the epoch
    assert decoded == [4, 4]  # one decode per batch of final latents


def test_trajectory_shapes_full_and_window(adapter):
    images, lat, lps, means = _run(adapter, ["a cat"] * 3, 4.5, full_window(6, 0.99), record_means=True)
    assert images.shape == (3, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    assert lat.shape == (3, 6, 16, 8, 8) and lps.shape == (3, 5) and means.shape == (3, 5, 16, 8, 8)
    assert torch.isfinite(lps).all()
    import random

    w = random_window(6, 2, 1, 5, random.Random(0))
    _, lat_w, lps_w, _ = _run(adapter, ["a cat"] * 3, 1.0, w, sde_type="cps")
    assert lat_w.shape == (3, 3, 16, 8, 8) and lps_w.shape == (3, 2)


def test_pure_ode_is_deterministic_and_seeded_per_image(adapter):
    a, *_ = _run(adapter, ["a cat", "a dog"], 4.5, None, seeds=[11, 12])
    b, *_ = _run(adapter, ["a cat", "a dog"], 4.5, None, seeds=[11, 12])
    assert torch.equal(a, b)
    # an image does not depend on its batch neighbour
    c, *_ = _run(adapter, ["a dog"], 4.5, None, seeds=[12])
    assert torch.allclose(a[1], c[0], atol=1e-5)


def test_sde_samples_differ_from_ode_and_to_uint8(adapter):
    ode, *_ = _run(adapter, ["a cat"], 4.5, None, seeds=[3])
    sde, *_ = _run(adapter, ["a cat"], 4.5, full_window(6), seeds=[3])
    assert not torch.allclose(ode, sde)
    u8 = to_uint8(sde)
    assert u8.shape == (1, 64, 64, 3) and u8.dtype.name == "uint8"
