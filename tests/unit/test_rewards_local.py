"""In-process rewards: OCR (RapidOCR, real models shipped in its wheel), the CLIP-based rewards on tiny random CLIPs
saved to disk (the real loading path), and the imagereward wrapper."""

from __future__ import annotations

import importlib.util
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import flowgrpo.rewards.clip_rewards as clip_rewards
import flowgrpo.rewards.imagereward as imagereward
import flowgrpo.rewards.ocr as ocr
from flowgrpo.rewards.base import REGISTRY, build_reward
from flowgrpo.rewards.testing import make_tiny_clip, save_aesthetic_head, tiny_clip_projection_dim

HAS_RAPIDOCR = importlib.util.find_spec("rapidocr_onnxruntime") is not None


def test_registered_names():
    for name in ("ocr", "aesthetic", "clipscore", "pickscore", "image_similarity", "imagereward"):
        assert name in REGISTRY, name


# --------------------------------------------------------------------------------------------------------- OCR


def render(items, size=(512, 128), font_size=40) -> np.ndarray:
    """Black text on white; ``items`` = [(text, (x, y)), ...]."""
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=font_size)
    for text, xy in items:
        draw.text(xy, text, fill="black", font=font)
    return np.asarray(im)


@pytest.fixture(scope="module")
def ocr_reward():
    if not HAS_RAPIDOCR:
        pytest.skip("rapidocr-onnxruntime is not installed")
    return build_reward("ocr", num_threads=2)


def test_extract_target():
    assert ocr.extract_target('a sign that says "Hello World" in neon') == "Hello World"
    assert ocr.extract_target("a poster reading “OPEN 24/7” on a wall") == "OPEN 24/7"
    assert ocr.extract_target('first "one" then "two"') == "one"
    assert ocr.extract_target("the ‘Cafe’ sign") == "Cafe"
    assert ocr.extract_target("a dog's bowl that says 'no'") is None  # straight single quotes are apostrophes
    assert ocr.extract_target('empty "" then "x"') == "x"
    assert ocr.extract_target("no quotes at all") is None


def test_distance_and_score_formula():
    assert ocr.levenshtein("kitten", "sitting") == 3
    assert ocr.levenshtein("", "abc") == 3
    assert ocr.normalize_text(" Hello\tWorld \n") == "helloworld"
    assert ocr.ocr_distance("xxhelloworldyy", "helloworld") == 0  # substring
    assert ocr.ocr_distance("", "hello") == 5
    assert ocr.ocr_distance("a much longer unrelated text", "hi") == 2  # capped at len(target)
    assert ocr.ocr_score("HELLO WORD", "hello world") == pytest.approx(1 - 1 / 10)
    assert ocr.ocr_score("anything", "") == 0.0


def test_reading_order_synthetic_boxes():
    def quad(x0, y0, x1, y1):
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]

    # one line, given right-to-left; the right word sits 12 px higher (a (top, left) sort would put it first)
    boxes = [quad(330, 38, 470, 76), quad(10, 50, 140, 88)]
    assert ocr.reading_order(boxes) == [1, 0]
    # two lines, each out of order, lines given bottom first
    boxes = [quad(300, 200, 400, 240), quad(10, 205, 120, 245), quad(250, 20, 380, 60), quad(5, 25, 100, 62)]
    assert ocr.reading_order(boxes) == [3, 2, 1, 0]
    # [x0, y0, x1, y1] boxes work too
    assert ocr.reading_order([[200, 0, 300, 30], [0, 2, 100, 32], [0, 100, 50, 130]]) == [1, 0, 2]
    assert ocr.reading_order([]) == []
    results = [[quad(330, 38, 470, 76), "WORLD", 0.99], [quad(10, 50, 140, 88), "HELLO", 0.98],
               [quad(10, 100, 50, 120), "noise", 0.0]]
    assert ocr.join_ocr_results(results) == "HELLOWORLD"  # confidence must be > 0
    assert ocr.join_ocr_results(None) == ""


def test_ocr_rendered_text(ocr_reward):
    img = render([("HELLO WORLD", (20, 40))])
    prompts = ['a sign that says "hello world"', "a neon “HELLO WORLD” sign", 'a sign that says "GOODBYE MOON"',
               'a sign that says "HELLO WORD"']
    out = ocr_reward(np.stack([img] * 4), prompts, [{}] * 4)
    assert out.scores.shape == (4,) and out.scores.dtype == np.float64
    assert out.scores[0] == pytest.approx(1.0) and out.scores[1] == pytest.approx(1.0)
    assert out.details[0]["recognized"] == "helloworld" and out.details[0]["target"] == "helloworld"
    assert out.scores[2] < 0.5  # wrong text entirely
    assert 0.5 < out.scores[3] < 1.0  # one letter off -> Levenshtein 1 of 9
    assert out.scores[3] == pytest.approx(1 - 1 / 9)
    assert np.all((out.scores >= 0) & (out.scores <= 1))


def test_ocr_box_order_in_image(ocr_reward):
    # two boxes on one line; the right one is drawn higher, which RapidOCR itself lists first
    img = render([("HELLO", (10, 50)), ("WORLD", (330, 32))])
    out = ocr_reward(img[None], ['"hello world"'], [{}])
    assert out.details[0]["recognized"] == "helloworld"
    assert out.scores[0] == pytest.approx(1.0)
    # two lines: top line first
    img = render([("BOTTOM", (10, 80)), ("TOP", (300, 5))])
    assert ocr_reward.recognize(img).lower() == "topbottom"


def test_ocr_blank_and_no_quotes(ocr_reward):
    blank = np.full((1, 128, 512, 3), 255, dtype=np.uint8)
    out = ocr_reward(blank, ['a sign saying "hello"'], [{}])
    assert out.scores.tolist() == [0.0] and out.details[0]["recognized"] == ""
    out = ocr_reward(render([("HELLO", (10, 40))])[None], ["a sign without quoted text"], [{}])
    assert out.scores.tolist() == [0.0] and out.details[0]["reason"] == "no quoted text in prompt"


def test_ocr_float_input_and_thread_pool(ocr_reward):
    img = render([("HELLO WORLD", (20, 40))])
    chw = torch.from_numpy(img.copy()).permute(2, 0, 1).float()[None] / 255.0  # [1, 3, H, W] in [0, 1]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda x: ocr_reward(x, ['"hello world"'], [{}]).scores[0], [chw, img[None]]))
    assert outs == [pytest.approx(1.0), pytest.approx(1.0)]


# ------------------------------------------------------------------------------------------ CLIP-based rewards


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    # logit scale 100 as OpenAI CLIP, so clipscore is 100 cos / 30 as with the real model
    return make_tiny_clip(tmp_path_factory.mktemp("rewards") / "tiny_clip", seed=0, logit_scale=100.0)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 48, 64, 3), dtype=np.uint8)
    imgs[1] = render([("A CAT", (10, 10))], size=(64, 48), font_size=12)
    return imgs


PROMPTS = ["a photo of a cat", "a red car", "two dogs in the snow", 'a sign that says "hi"', ""]


@pytest.fixture(scope="module")
def reference(clip_dir):
    """The tiny model, processor and tokenizer loaded independently of the reward code."""
    from transformers import CLIPModel

    from flowgrpo.models.tiny import build_clip_tokenizer

    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    proc = clip_rewards.image_processor_class().from_pretrained(str(clip_dir))
    tok = build_clip_tokenizer()  # in memory: also checks the saved tokenizer round-trips
    return model, proc, tok


def _ref_inputs(reference, imgs, prompts):
    model, proc, tok = reference
    px = proc(images=[Image.fromarray(i) for i in imgs], return_tensors="pt")["pixel_values"]
    enc = tok(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
    return px, enc


def _feat(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_processor_without_torchvision(clip_dir, images):
    r = build_reward("clipscore", model=str(clip_dir), device="cpu")
    px = r.clip.pixel_values(images)
    assert px.shape == (5, 3, 32, 32) and px.dtype == torch.float32
    if importlib.util.find_spec("torchvision") is None:
        assert "Pil" in type(r.clip.image_processor).__name__


def test_clipscore_matches_direct_computation(clip_dir, images, reference):
    r = build_reward("clipscore", model=str(clip_dir), device="cpu", batch_size=2)
    out = r(images, PROMPTS, [{}] * 5)
    assert out.scores.shape == (5,) and out.scores.dtype == np.float64 and len(out.details) == 5
    np.testing.assert_array_equal(out.scores, r(images, PROMPTS, [{}] * 5).scores)  # deterministic
    px, enc = _ref_inputs(reference, images, PROMPTS)
    with torch.no_grad():
        logits = reference[0](pixel_values=px, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    expected = logits.logits_per_image.diagonal().double().numpy() / 30
    np.testing.assert_allclose(out.scores, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(out.scores) <= 100 / 30 + 1e-6)


def test_pickscore_matches_formula(clip_dir, images, reference):
    r = build_reward("pickscore", model=str(clip_dir), processor=f"file://{clip_dir}", device="auto", batch_size=3)
    out = r(images, PROMPTS, [{}] * 5)
    model = reference[0]
    px, enc = _ref_inputs(reference, images, PROMPTS)
    with torch.no_grad():
        img = _feat(model.get_image_features(pixel_values=px))
        txt = _feat(model.get_text_features(**enc))
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        expected = (model.logit_scale.exp() * (img * txt).sum(-1) / 26).double().numpy()
    np.testing.assert_allclose(out.scores, expected, rtol=1e-5, atol=1e-6)
    assert out.scores.shape == (5,) and r.clip.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert all(-1 <= d["cos"] <= 1 for d in out.details)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_head_layout_and_formula(clip_dir, images, reference, tmp_path, suffix):
    dim = tiny_clip_projection_dim(clip_dir)
    head_file = save_aesthetic_head(tmp_path / f"head{suffix}", input_dim=dim, seed=3)
    r = build_reward("aesthetic", model=str(clip_dir), head_path=str(head_file), device="cpu")
    assert sorted(r.head.state_dict()) == sorted(clip_rewards.expected_aesthetic_keys())
    assert clip_rewards.expected_aesthetic_keys() == [
        "layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias", "layers.4.weight", "layers.4.bias",
        "layers.6.weight", "layers.6.bias", "layers.7.weight", "layers.7.bias"]
    out = r(images, PROMPTS, [{}] * 5)
    assert out.scores.shape == (5,)
    # independent: normalised embedding through the five linear layers of the saved state dict
    sd = clip_rewards.load_state_dict_file(head_file)
    assert sd["layers.0.weight"].shape == (1024, dim) and sd["layers.7.weight"].shape == (1, 16)
    px, _ = _ref_inputs(reference, images, PROMPTS[:1])
    with torch.no_grad():
        x = _feat(reference[0].get_image_features(pixel_values=px))
        x = x / x.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):
            x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    np.testing.assert_allclose(out.scores, x.squeeze(-1).double().numpy(), rtol=1e-5, atol=1e-6)


def test_aesthetic_head_discovery_and_errors(clip_dir, tmp_path):
    dim = tiny_clip_projection_dim(clip_dir)
    with pytest.raises(FileNotFoundError, match="head_path"):
        build_reward("aesthetic", model=str(clip_dir), device="cpu")
    # a directory holding the public file name
    d = tmp_path / "headdir"
    save_aesthetic_head(d / "sac+logos+ava1-l14-linearMSE.pth", input_dim=dim)
    r = build_reward("aesthetic", model=str(clip_dir), head_path=str(d), device="cpu")
    assert r.head_file.name == "sac+logos+ava1-l14-linearMSE.pth"
    # wrapper prefixes are stripped
    sd = {f"mlp.{k}": v for k, v in clip_rewards.load_state_dict_file(r.head_file).items()}
    torch.save(sd, tmp_path / "prefixed.pth")
    build_reward("aesthetic", model=str(clip_dir), head_path=str(tmp_path / "prefixed.pth"), device="cpu")
    # wrong input size (a ViT-L/14 head on a 16-d CLIP) and a broken layout
    save_aesthetic_head(tmp_path / "l14.pth", input_dim=768)
    with pytest.raises(ValueError, match="768-d"):
        build_reward("aesthetic", model=str(clip_dir), head_path=str(tmp_path / "l14.pth"), device="cpu")
    bad = {k: v for k, v in sd.items() if "layers.7" not in k}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="layout"):
        build_reward("aesthetic", model=str(clip_dir), head_path=str(tmp_path / "bad.pth"), device="cpu")


def test_image_similarity(clip_dir, images, tmp_path):
    r = build_reward("image_similarity", model=str(clip_dir), device="cpu", batch_size=2)
    path = tmp_path / "ref.png"
    Image.fromarray(images[2]).save(path)
    meta = [{"image": images[0]}, {"image": Image.fromarray(images[1])}, {"image": str(path)},
            {"image": images[0]}, {"image": torch.from_numpy(images[4].copy()).permute(2, 0, 1).float() / 255}]
    out = r(images, None, meta)
    assert out.scores.shape == (5,)
    np.testing.assert_allclose(out.scores[[0, 1, 2, 4]], 1.0, atol=1e-5)  # each image vs itself
    assert out.scores[3] < 0.9999 and -1 <= out.scores[3] <= 1
    with pytest.raises(ValueError, match=r"metadata\[1\]"):
        r(images[:2], None, [{"image": images[0]}, {}])


def test_clip_rewards_thread_pool_matches_serial(clip_dir, images):
    r = build_reward("clipscore", model=str(clip_dir), device="cpu", batch_size=2)
    serial = r(images, PROMPTS, [{}] * 5).scores
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: r(images, PROMPTS, [{}] * 5).scores, range(4)))
    for o in outs:
        np.testing.assert_allclose(o, serial, rtol=1e-6, atol=1e-7)


def test_clip_missing_model_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_reward("clipscore", model=str(tmp_path / "nope"), device="cpu")


def test_resolve_dtype_and_device():
    assert clip_rewards.resolve_dtype("bf16") is torch.bfloat16
    assert clip_rewards.resolve_dtype(None) is torch.float32
    with pytest.raises(ValueError):
        clip_rewards.resolve_dtype("int3")
    assert clip_rewards.resolve_device("cpu").type == "cpu"


# ------------------------------------------------------------------------------------------------ imagereward


def test_imagereward_unavailable_is_clear():
    if importlib.util.find_spec("ImageReward") is not None:
        pytest.skip("image-reward is installed here")
    with pytest.raises(imagereward.RewardUnavailableError, match="image-reward"):
        build_reward("imagereward")


def test_imagereward_wrapper_with_stand_in_package(monkeypatch, tmp_path):
    calls = {}

    class FakeModel:
        def eval(self):
            calls["eval"] = True
            return self

        def score(self, prompt, image):
            assert isinstance(image, Image.Image) and image.mode == "RGB"
            return len(prompt) + float(np.asarray(image).mean()) / 255.0

    def load(name, device="cpu", download_root=None, med_config=None):
        calls.update(name=name, device=device, download_root=download_root, med_config=med_config)
        return FakeModel()

    fake = types.ModuleType("ImageReward")
    fake.load = load
    monkeypatch.setitem(sys.modules, "ImageReward", fake)
    d = tmp_path / "ir"
    d.mkdir()
    (d / "ImageReward.pt").write_bytes(b"stub")
    (d / "med_config.json").write_text("{}")
    r = build_reward("imagereward", model=str(d), device="cpu", download_root=str(tmp_path / "dl"))
    assert calls["name"] == str(d / "ImageReward.pt") and calls["med_config"] == str(d / "med_config.json")
    assert calls["device"] == "cpu" and calls["download_root"] == str(tmp_path / "dl") and calls["eval"]
    imgs = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    imgs[1] = 255
    out = r(imgs, ["ab", "abcd"], [{}, {}])
    np.testing.assert_allclose(out.scores, [2.0, 5.0])
    build_reward("imagereward")  # the package's own name is passed through for it to download
    assert calls["name"] == "ImageReward-v1.0" and calls["med_config"] is None
