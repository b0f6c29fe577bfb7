"""The models behind GenEval scoring: an instance detector and a colour classifier.

* :class:`Detector` - the interface the rules need: ``detect(images uint8 [N, H, W, 3]) -> [[Detection, ...] per
  image]`` with COCO class names (:data:`COCO_CLASSES`, GenEval's ``object_names.txt`` order and spelling).
* :class:`Mask2FormerDetector` - transformers ``Mask2FormerForUniversalSegmentation`` (default
  ``facebook/mask2former-swin-small-coco-instance``, the Swin-S COCO instance model GenEval uses through
  mmdetection) with mmdetection-style instance post-processing: class probabilities (softmax without the
  no-object column), top-k (query, class) pairs over all queries x classes, masks upsampled to the padded input,
  cropped to the valid region and resized to the original image, binarised at logit 0, score = class probability
  x mean mask probability inside the mask, box = the mask's extent (x1/y1 exclusive, as mmdetection's
  ``mask2bbox``). Images are resized like mmdetection's test pipeline (shortest edge 800, longest <= 1333) unless
  ``size`` says otherwise.
* :class:`ClipColorClassifier` - transformers ``CLIPModel`` (default ``openai/clip-vit-large-patch14``) zero-shot
  over :data:`~.rules.COLORS`: per colour the normalised mean of the normalised text embeddings of the three
  templates "a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object"; a crop's colour
  is the argmax of cosine similarity.

Model locations go through :func:`flowgrpo.models.loading.resolve_model_path` (local directory, ``file://``,
``s3://``, or a hub id). Both load at construction, in eval mode, and hold a lock around the model so a thread
pool may share one instance.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from flowgrpo.rewards.geneval.rules import COLORS, THRESHOLD, Detection

log = logging.getLogger(__name__)

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_COLOR_MODEL = "openai/clip-vit-large-patch14"
#: mmdetection's Mask2Former COCO test-time resize (keep ratio)
MMDET_TEST_SIZE = {"shortest_edge": 800, "longest_edge": 1333}
COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")

#: GenEval's 80 COCO class names (``object_names.txt``), index = COCO contiguous label id
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
#: other spellings of COCO names (detectron2/HF, VOC, ...) -> GenEval's
COCO_ALIASES: dict[str, str] = {
    "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard", "tvmonitor": "tv",
    "tv monitor": "tv", "television": "tv", "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch",
    "pottedplant": "potted plant", "diningtable": "dining table", "hair dryer": "hair drier",
    "cellphone": "cell phone", "mobile phone": "cell phone", "doughnut": "donut", "wineglass": "wine glass",
    "hotdog": "hot dog", "teddybear": "teddy bear", "sportsball": "sports ball", "firehydrant": "fire hydrant",
    "stopsign": "stop sign", "trafficlight": "traffic light", "parkingmeter": "parking meter",
    "baseballbat": "baseball bat", "baseballglove": "baseball glove", "tennisracket": "tennis racket",
}


class Detector(Protocol):
    def detect(self, images: np.ndarray) -> list[list[Detection]]:
        """uint8 [N, H, W, 3] -> per image, its detections (COCO names of :data:`COCO_CLASSES`, box in pixels,
        bool mask [H, W], colour None)."""
        ...


# ------------------------------------------------------------------------------------------------ helpers


def _normalise_name(name: str) -> str:
    return re.sub(r"\s+", " ", str(name).lower().replace("_", " ").replace("-", " ")).strip()


def coco_label_map(id2label: Mapping[Any, str]) -> dict[int, str]:
    """Model label id -> GenEval COCO name. Labels are matched by name (case, ``_``/``-`` and the aliases of
    :data:`COCO_ALIASES` forgiven); labels that are no COCO thing class (e.g. panoptic "stuff") are left out. If no
    label matches by name and there are exactly 80 labels (generic ``LABEL_i`` names), ids map by COCO order."""
    known = {_normalise_name(n): n for n in COCO_CLASSES}
    known.update({_normalise_name(k): v for k, v in COCO_ALIASES.items()})
    out: dict[int, str] = {}
    for key, name in id2label.items():
        hit = known.get(_normalise_name(name)) or known.get(_normalise_name(name).replace(" ", ""))
        if hit is not None:
            out[int(key)] = hit
    if not out and len(id2label) == len(COCO_CLASSES):
        log.warning("detector labels have no COCO names; mapping its 80 label ids to COCO classes by order")
        return {int(k): COCO_CLASSES[int(k)] for k in id2label}
    if not out:
        raise ValueError(f"none of the detector's {len(id2label)} labels is a COCO class")
    if len(set(out.values())) < len(out):
        raise ValueError("several detector labels map to the same COCO class")
    missing = sorted(set(COCO_CLASSES) - set(out.values()))
    if missing:
        log.warning("detector has no label for COCO classes %s; GenEval prompts about them cannot succeed", missing)
    return out


def _resolve_device(device: Any) -> Any:
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    try:
        return names[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(names)}") from None


def _pil_processor_class(pil_name: str, legacy_name: str) -> Any:
    """The PIL-backed image processor class (``XxxImageProcessorPil`` on transformers >= 5: no torchvision
    needed; ``XxxImageProcessor`` before, where it is the PIL/numpy one)."""
    import transformers

    cls = getattr(transformers, pil_name, None)
    return cls if cls is not None else getattr(transformers, legacy_name)


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """bool [K, H, W] -> float [K, 4] (x0, y0, x1, y1) with exclusive x1/y1 (pixel extent); empty mask -> zeros."""
    masks = np.asarray(masks, dtype=bool)
    boxes = np.zeros((masks.shape[0], 4), dtype=np.float64)
    for k, m in enumerate(masks):
        cols = np.flatnonzero(m.any(axis=0))
        rows = np.flatnonzero(m.any(axis=1))
        if cols.size and rows.size:
            boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def instances_from_logits(class_logits: Any, mask_logits: Any, labels: Mapping[int, str], *,
                          input_hw: tuple[int, int], valid_hw: tuple[int, int], image_hw: tuple[int, int],
                          score_threshold: float = THRESHOLD, max_per_image: int | None = None) -> list[Detection]:
    """One image's Mask2Former outputs -> detections (mmdetection's instance post-processing).

    ``class_logits`` [Q, C+1] (last = no object), ``mask_logits`` [Q, h, w] at 1/4 of the padded input
    ``input_hw``; the resized image occupies ``valid_hw`` (top-left) of the input; ``image_hw`` = the original
    size. Keeps the top ``max_per_image`` (default Q) (query, class) pairs, and of those the ones whose final score
    (class probability x mean mask probability) is > ``score_threshold`` (pairs whose class probability alone is
    not above it are skipped before the masks are upsampled: the final score cannot exceed it)."""
    import torch
    import torch.nn.functional as F

    class_logits = class_logits.float()
    probs = class_logits.softmax(-1)[:, :-1]  # [Q, C]
    n_queries, n_classes = probs.shape
    k = min(int(max_per_image or n_queries), n_queries * n_classes)
    top_scores, top_idx = probs.flatten().topk(k)
    query_idx = torch.div(top_idx, n_classes, rounding_mode="floor")
    label_idx = top_idx % n_classes
    keep = top_scores > score_threshold
    keep &= torch.tensor([int(lab) in labels for lab in label_idx.tolist()], dtype=torch.bool,
                         device=keep.device)
    if not bool(keep.any()):
        return []
    top_scores, query_idx, label_idx = top_scores[keep], query_idx[keep], label_idx[keep]
    masks = mask_logits[query_idx].float()[None]  # [1, K, h, w]
    masks = F.interpolate(masks, size=tuple(input_hw), mode="bilinear", align_corners=False)
    masks = masks[..., : valid_hw[0], : valid_hw[1]]
    masks = F.interpolate(masks, size=tuple(image_hw), mode="bilinear", align_corners=False)[0]  # [K, H, W]
    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    scores = top_scores * mask_scores
    final = scores > score_threshold
    binary_np = binary[final].cpu().numpy()
    boxes = boxes_from_masks(binary_np)
    out = []
    for m, box, score, lab in zip(binary_np, boxes, scores[final].tolist(), label_idx[final].tolist()):
        out.append(Detection(cls=labels[int(lab)], score=float(score), box=tuple(float(v) for v in box), mask=m))
    out.sort(key=lambda d: -d.score)
    return out


# ----------------------------------------------------------------------------------------------- detector


class Mask2FormerDetector:
    """COCO instance detector (see the module docstring).

    ``model``: a location for :func:`resolve_model_path` holding a Mask2Former config, weights and image
    processor config; ``size``: resize spec for the image processor (default mmdetection's shortest edge 800 /
    longest 1333; None = the processor's own); ``score_threshold``: detections at or below it are dropped (0.3,
    the lowest GenEval threshold, loses nothing); ``max_per_image``: top-k (query, class) pairs considered (default
    the number of queries, 100, as mmdetection)."""

    def __init__(self, model: str = DEFAULT_DETECTOR, device: Any = "auto", *, dtype: Any = "float32",
                 size: Mapping[str, int] | None = MMDET_TEST_SIZE, batch_size: int = 8,
                 score_threshold: float = THRESHOLD, max_per_image: int | None = None,
                 revision: str | None = None, cache_dir: Any = None):
        import torch
        from transformers import Mask2FormerForUniversalSegmentation

        from flowgrpo.models.loading import resolve_model_path

        path = resolve_model_path(model, revision=revision, cache_dir=cache_dir)
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype)
        net = Mask2FormerForUniversalSegmentation.from_pretrained(str(path))  # needs scipy (its loss module)
        self.model = net.to(self.device, self.dtype).eval()
        self.model.requires_grad_(False)
        proc_cls = _pil_processor_class("Mask2FormerImageProcessorPil", "Mask2FormerImageProcessor")
        self.processor = proc_cls.from_pretrained(str(path))
        self.size = dict(size) if size is not None else None
        self.batch_size = int(batch_size)
        self.score_threshold = float(score_threshold)
        self.max_per_image = max_per_image
        self.labels = coco_label_map(self.model.config.id2label)
        self._lock = threading.Lock()
        self._torch = torch

    def _preprocess(self, images: Sequence[np.ndarray]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"return_tensors": "pt"}
        if self.size is not None:
            kwargs["size"] = self.size
        return self.processor(images=list(images), **kwargs)

    def detect(self, images: np.ndarray) -> list[list[Detection]]:
        from flowgrpo.rewards.base import as_uint8

        images = as_uint8(images)
        results: list[list[Detection]] = []
        torch = self._torch
        with self._lock, torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                inputs = self._preprocess(chunk)
                pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
                pixel_mask = inputs.get("pixel_mask")
                out = self.model(pixel_values=pixel_values,
                                 pixel_mask=None if pixel_mask is None else pixel_mask.to(self.device))
                input_hw = tuple(pixel_values.shape[-2:])
                for i, image in enumerate(chunk):
                    if pixel_mask is not None:
                        pm = pixel_mask[i].bool()
                        valid_hw = (int(pm.any(1).sum()), int(pm.any(0).sum()))
                    else:
                        valid_hw = input_hw
                    results.append(instances_from_logits(
                        out.class_queries_logits[i], out.masks_queries_logits[i], self.labels,
                        input_hw=input_hw, valid_hw=valid_hw, image_hw=tuple(image.shape[:2]),
                        score_threshold=self.score_threshold, max_per_image=self.max_per_image))
        return results


# ---------------------------------------------------------------------------------------- colour classifier


class ClipColorClassifier:
    """CLIP zero-shot colour of object crops (a :class:`~.rules.ColorClassifier`). Text classifiers are built
    once per object class and cached."""

    def __init__(self, model: str = DEFAULT_COLOR_MODEL, device: Any = "auto", *, dtype: Any = "float32",
                 colors: Sequence[str] = COLORS, templates: Sequence[str] = COLOR_TEMPLATES, batch_size: int = 16,
                 revision: str | None = None, cache_dir: Any = None):
        import torch
        from transformers import AutoTokenizer, CLIPModel

        from flowgrpo.models.loading import resolve_model_path

        path = resolve_model_path(model, revision=revision, cache_dir=cache_dir)
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype)
        self.model = CLIPModel.from_pretrained(str(path)).to(self.device, self.dtype).eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.image_processor = _pil_processor_class("CLIPImageProcessorPil", "CLIPImageProcessor").from_pretrained(
            str(path))
        self.colors = tuple(colors)
        self.templates = tuple(templates)
        self.batch_size = int(batch_size)
        self._classifiers: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._torch = torch

    def _features(self, out: Any) -> Any:
        # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
        return out if isinstance(out, self._torch.Tensor) else out.pooler_output

    def text_classifier(self, classname: str) -> Any:
        """[n_colours, D]: per colour the L2-normalised mean of the L2-normalised template embeddings."""
        torch = self._torch
        if classname not in self._classifiers:
            rows = []
            for c in self.colors:
                texts = [t.format(c=c, obj=classname) for t in self.templates]
                tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
                emb = self._features(self.model.get_text_features(input_ids=tok["input_ids"],
                                                                  attention_mask=tok["attention_mask"]))
                emb = torch.nn.functional.normalize(emb.float(), dim=-1).mean(0)
                rows.append(emb / emb.norm())
            self._classifiers[classname] = torch.stack(rows)
        return self._classifiers[classname]

    def __call__(self, crops: Sequence[np.ndarray], classname: str) -> list[str]:
        if len(crops) == 0:
            return []
        torch = self._torch
        out: list[str] = []
        with self._lock, torch.no_grad():
            clf = self.text_classifier(classname)
            for start in range(0, len(crops), self.batch_size):
                chunk = [np.ascontiguousarray(np.asarray(c, dtype=np.uint8))
                         for c in crops[start : start + self.batch_size]]
                pixels = self.image_processor(images=chunk, return_tensors="pt")["pixel_values"]
                feats = self._features(
                    self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
                feats = torch.nn.functional.normalize(feats.float(), dim=-1)
                out.extend(self.colors[int(i)] for i in (feats @ clf.T).argmax(-1).tolist())
        return out


__all__ = [
    "COCO_ALIASES", "COCO_CLASSES", "COLOR_TEMPLATES", "ClipColorClassifier", "DEFAULT_COLOR_MODEL",
    "DEFAULT_DETECTOR", "Detector", "MMDET_TEST_SIZE", "Mask2FormerDetector", "boxes_from_masks", "coco_label_map",
    "instances_from_logits",
]
