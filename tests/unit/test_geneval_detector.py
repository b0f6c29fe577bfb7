"""GenEval models and reward: tiny random Mask2Former / CLIP directories loaded through the real loading path
(shapes and types only: random weights detect garbage), the mmdetection-style post-processing on hand-made
logits, COCO label mapping, and the ``geneval`` reward end to end with an injected fake detector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from flowgrpo.rewards import REGISTRY, WeightedReward, build_reward  # noqa: E402
from flowgrpo.rewards.geneval import GenEvalReward, geneval_metrics  # noqa: E402
from flowgrpo.rewards.geneval.detector import (COCO_CLASSES, ClipColorClassifier, Mask2FormerDetector,  # noqa: E402
                                               boxes_from_masks, coco_label_map, instances_from_logits)
from flowgrpo.rewards.geneval.rules import COLORS, TAGS, Detection  # noqa: E402

#: detectron2 / Hugging Face spellings of the three classes GenEval names differently
HF_NAMES = [{"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}.get(n, n)
            for n in COCO_CLASSES]


def _make_tiny_mask2former(out: Path) -> Path:
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessorPil,
                              SwinConfig)

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    # feature sizes must be multiples of 32 (the pixel decoder uses GroupNorm(32, ...))
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=32, num_queries=8,
                               id2label=dict(enumerate(HF_NAMES)), label2id={n: i for i, n in enumerate(HF_NAMES)})
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    model.save_pretrained(out)
    Mask2FormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(out)
    return out


def _make_tiny_clip(out: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from flowgrpo.models.tiny import build_clip_tokenizer

    tok = build_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("geneval_models")
    return {"detector": _make_tiny_mask2former(root / "m2f"), "clip": _make_tiny_clip(root / "clip")}


def _images(n: int = 2, size: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ Mask2Former


def test_mask2former_loads_and_detects_shapes_and_types(tiny_dirs):
    det = Mask2FormerDetector(str(tiny_dirs["detector"]), device="cpu", size={"shortest_edge": 64, "longest_edge": 64},
                              score_threshold=0.0, max_per_image=5, batch_size=1)
    assert det.labels[64] == "computer mouse" and det.labels[0] == "person" and len(det.labels) == 80
    out = det.detect(_images(2))
    assert isinstance(out, list) and len(out) == 2
    assert sum(len(d) for d in out) > 0  # threshold 0: the random model's top pairs survive
    for dets in out:
        assert len(dets) <= 5
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
        for d in dets:
            assert isinstance(d, Detection) and d.cls in COCO_CLASSES and d.color is None
            assert isinstance(d.score, float) and 0.0 < d.score <= 1.0
            assert len(d.box) == 4 and all(isinstance(v, float) for v in d.box)
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert d.mask.shape == (64, 64) and d.mask.dtype == bool and d.mask.any()
            np.testing.assert_array_equal(boxes_from_masks(d.mask[None])[0], d.box)
    # default threshold (0.3): a random model is never that confident; non-square inputs and float tensors work
    det_default = Mask2FormerDetector("file://" + str(tiny_dirs["detector"]), device="cpu",
                                      size={"shortest_edge": 64, "longest_edge": 96})
    out = det_default.detect(torch.rand(1, 3, 48, 80))
    assert len(out) == 1 and all(d.score > 0.3 and d.mask.shape == (48, 80) for d in out[0])


def test_missing_model_directory_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        Mask2FormerDetector(str(tmp_path / "nope" / "model"), device="cpu")


def test_instances_from_logits_by_hand():
    """One confident "dog" query whose mask logits are +10 on cells rows 4..7, cols 2..9 of a 16x16 map (-10
    elsewhere); a no-object query; a "cat" query with an empty mask. Upsampled x4 (bilinear, align_corners=False)
    the zero crossings fall at pixel 7.5 / 39.5 (x) and 15.5 / 31.5 (y): box (8, 16, 40, 32)."""
    q, c = 3, 80
    cls = torch.full((q, c + 1), -10.0)
    cls[0, 16] = 10.0  # dog
    cls[1, c] = 10.0  # no object
    cls[2, 15] = 2.0  # cat, p ~ 0.5
    masks = torch.full((q, 16, 16), -10.0)
    masks[0, 4:8, 2:10] = 10.0
    labels = {i: n for i, n in enumerate(COCO_CLASSES)}
    out = instances_from_logits(cls, masks, labels, input_hw=(64, 64), valid_hw=(64, 64), image_hw=(64, 64),
                                score_threshold=0.3)
    assert len(out) == 1
    d = out[0]
    assert d.cls == "dog" and d.box == (8.0, 16.0, 40.0, 32.0)
    # the rectangle minus its 4 corner pixels (bilinear: at (8, 16) only 39% of the weight is on a +10 cell)
    assert d.mask.sum() == 32 * 16 - 4 and not d.mask[16, 8] and d.mask[16, 9] and d.mask[17, 8]
    assert 0.9 < d.score <= 1.0  # p(dog) ~ 1 times the mean sigmoid inside the mask
    # the image fills only the top half (valid 32 x 64) of the padded input and is twice as big: the mask is cut to
    # the valid region, then resized to (64, 128): crossings at 2*(15.5+0.5)-0.5 = 31.5 (y) and 15.5 / 79.5 (x);
    # the bottom edge of the mask is the bottom of the image
    masks2 = torch.full((q, 16, 16), -10.0)
    masks2[0, 4:8, 2:10] = 10.0
    masks2[0, 9:, :] = 10.0  # padding area (pixels >= 34 of the upsampled map): must be ignored
    out = instances_from_logits(cls, masks2, labels, input_hw=(64, 64), valid_hw=(32, 64), image_hw=(64, 128))
    assert len(out) == 1 and out[0].box == (16.0, 32.0, 80.0, 64.0) and out[0].mask.shape == (64, 128)
    # a label the map does not know (a "stuff" class of a panoptic model) is dropped
    assert instances_from_logits(cls, masks, {15: "cat"}, input_hw=(64, 64), valid_hw=(64, 64),
                                 image_hw=(64, 64)) == []
    # the cat query passes a 0.3 class threshold but its empty mask gives score 0
    assert instances_from_logits(cls, masks, {15: "cat"}, input_hw=(64, 64), valid_hw=(64, 64), image_hw=(64, 64),
                                 score_threshold=0.0) == []


def test_boxes_from_masks():
    m = np.zeros((2, 10, 20), dtype=bool)
    m[0, 2:5, 3:7] = True
    np.testing.assert_array_equal(boxes_from_masks(m), [[3, 2, 7, 5], [0, 0, 0, 0]])


def test_coco_label_map():
    assert coco_label_map(dict(enumerate(HF_NAMES))) == dict(enumerate(COCO_CLASSES))
    assert coco_label_map({i: f"LABEL_{i}" for i in range(80)}) == dict(enumerate(COCO_CLASSES))
    panoptic = {0: "person", 1: "Dining_Table", 2: "tv", 3: "tree-merged", 4: "sky-other-merged", 5: "cell-phone"}
    assert coco_label_map(panoptic) == {0: "person", 1: "dining table", 2: "tv", 5: "cell phone"}
    with pytest.raises(ValueError):
        coco_label_map({0: "sky", 1: "grass"})


# --------------------------------------------------------------------------------------------- CLIP colours


def test_clip_color_classifier_loads_and_classifies(tiny_dirs):
    clf = ClipColorClassifier(str(tiny_dirs["clip"]), device="cpu", batch_size=2)
    crops = [np.full((h, w, 3), v, dtype=np.uint8) for h, w, v in [(10, 20, 0), (33, 7, 128), (64, 64, 255)]]
    out = clf(crops, "dining table")
    assert len(out) == 3 and all(c in COLORS for c in out)
    w = clf.text_classifier("dining table")
    assert tuple(w.shape) == (10, 16)
    np.testing.assert_allclose(w.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    assert clf.text_classifier("dining table") is w  # cached per class
    assert clf([], "cup") == []


# ----------------------------------------------------------------------------------------------- reward


class FakeDetector:
    """Returns the given detections per image, in order."""

    def __init__(self, per_image: list[list[Detection]]):
        self.per_image = per_image
        self.seen: list[tuple[int, ...]] = []

    def detect(self, images):
        self.seen.append(tuple(images.shape))
        return [list(d) for d in self.per_image[: len(images)]]


class PixelColours:
    """Colour of a crop = the palette colour nearest to the mean of its non-grey pixels."""

    PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}

    def __init__(self):
        self.classnames: list[str] = []

    def __call__(self, crops, classname):
        self.classnames.append(classname)
        out = []
        for c in crops:
            px = c.reshape(-1, 3).astype(float)
            px = px[(px != 153).any(axis=1)]
            mean = px.mean(0)
            out.append(min(self.PALETTE, key=lambda k: float(np.sum((np.array(self.PALETTE[k]) - mean) ** 2))))
        return out


def _scene():
    """Image 0: a red car (mask) on a blue background; image 1: a laptop left of a cow; image 2: nothing."""
    imgs = np.zeros((3, 64, 64, 3), dtype=np.uint8)
    imgs[0] = (0, 0, 255)
    imgs[0, 10:30, 10:30] = (255, 0, 0)
    car_mask = np.zeros((64, 64), dtype=bool)
    car_mask[10:30, 10:30] = True
    dets = [
        [Detection("car", 0.8, (8.0, 8.0, 32.0, 32.0), car_mask), Detection("car", 0.2, (0, 0, 5, 5), None)],
        [Detection("laptop", 0.9, (0, 20, 20, 40), None), Detection("cow", 0.7, (40, 20, 60, 40), None)],
        [],
    ]
    metas = [
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
        {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                        {"class": "cow", "count": 1, "position": ["right of", 0]}],
         "prompt": "a photo of a cow right of a laptop"},
        {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}],
         "prompt": "a photo of two cups"},
    ]
    return imgs, dets, metas


def test_reward_end_to_end_with_injected_models():
    imgs, dets, metas = _scene()
    colours = PixelColours()
    reward = build_reward("geneval", detector=FakeDetector(dets), color=colours)
    assert isinstance(reward, GenEvalReward) and REGISTRY["geneval"] is GenEvalReward
    out = reward(imgs, [m["prompt"] for m in metas], metas)
    np.testing.assert_allclose(out.scores, [1.0, 1.0, 0.0])  # counting: L = [1 - |2 - 0| / 2] = [0]
    assert out.scores.dtype == np.float64 and out.scores.shape == (3,)
    assert [d["correct"] for d in out.details] == [True, True, False]
    assert [d["strict_correct"] for d in out.details] == [True, True, False]
    assert [d["tag"] for d in out.details] == ["colors", "position", "counting"]
    assert out.details[0]["detections"] == [{"class": "car", "score": 0.8, "box": [8.0, 8.0, 32.0, 32.0],
                                             "color": "red"}]  # the 0.2 car is filtered out
    assert "expected cup==2, found 0" in out.details[2]["reason"]
    assert colours.classnames == ["car"]
    json.dumps(out.details)
    metrics = geneval_metrics(out.details)
    np.testing.assert_array_equal(metrics["accuracy"], [1, 1, 0])
    np.testing.assert_array_equal(metrics["counting_strict_accuracy"], [-10, -10, 0])
    np.testing.assert_array_equal(metrics["colors_accuracy"], [1, -10, -10])
    assert set(metrics) == {"accuracy", "strict_accuracy"} | {f"{t}_{k}" for t in TAGS
                                                              for k in ("accuracy", "strict_accuracy")}


def test_reward_scores_follow_the_image_and_only_strict():
    imgs, dets, metas = _scene()
    imgs[0, 10:30, 10:30] = (0, 255, 0)  # the car is green now
    reward = GenEvalReward(detector=FakeDetector(dets), color=PixelColours(), only_strict=True)
    out = reward(imgs.astype(np.float32) / 255.0, [""] * 3, metas)  # float [N, H, W, 3] in [0, 1] is accepted too
    assert out.scores[0] == pytest.approx(0.5)  # L = [1, 0]
    assert not any(d["correct"] for d in out.details)  # only_strict: no standard verdict
    assert out.details[1]["strict_correct"]
    with pytest.raises(ValueError, match="metadata"):
        reward(imgs, [""] * 3, metas[:2])
    with pytest.raises(ValueError, match="include"):
        reward(imgs[:1], [""], [{"tag": "colors"}])


def test_reward_in_a_weighted_combination():
    imgs, dets, metas = _scene()
    w = WeightedReward({"geneval": 1.0}, rewards={"geneval": GenEvalReward(detector=FakeDetector(dets),
                                                                            color=PixelColours())})
    out = w(imgs, [""] * 3, metas)
    np.testing.assert_allclose(out["avg"], [1.0, 1.0, 0.0])


def test_reward_with_tiny_real_models(tiny_dirs):
    """The default construction path (Mask2Former + lazily built CLIP) on the tiny directories: plumbing only."""
    reward = build_reward("geneval", model=str(tiny_dirs["detector"]), color_model=str(tiny_dirs["clip"]),
                          device="cpu", lazy_color=True,
                          detector_options={"size": {"shortest_edge": 64, "longest_edge": 64}})
    metas = [{"tag": "single_object", "include": [{"class": "bowl", "count": 1}]},
             {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}]}]
    out = reward(_images(2), ["a photo of a bowl", "a photo of a red cup"], metas)
    assert out.scores.shape == (2,) and np.isfinite(out.scores).all() and (out.scores <= 1.0).all()
    assert all(set(d) >= {"correct", "strict_correct", "tag", "detections", "reason"} for d in out.details)
    assert isinstance(reward.color, ClipColorClassifier)


def test_reward_with_tiny_clip_colours_and_fake_detector(tiny_dirs):
    """Colour questions go to the real (tiny) CLIP classifier with mask-on-grey crops of the image."""
    imgs, dets, metas = _scene()
    reward = GenEvalReward(detector=FakeDetector(dets), color_model=str(tiny_dirs["clip"]), device="cpu")
    out = reward(imgs, [""] * 3, metas)
    car = out.details[0]["detections"][0]
    assert car["class"] == "car" and car["color"] in COLORS
    assert out.scores[0] == (1.0 if car["color"] == "red" else 0.5)  # L = [1, 1] or [1, 0]
    assert out.details[0]["strict_correct"] == (car["color"] == "red")
