"""GenEval scoring: rules (:mod:`.rules`, pure numpy), models (:mod:`.detector`: Mask2Former + CLIP colours) and
the ``geneval`` reward (:mod:`.reward`; importing this package registers it)."""

from flowgrpo.rewards.geneval.detector import (COCO_CLASSES, ClipColorClassifier, Detector, Mask2FormerDetector,
                                               coco_label_map)
from flowgrpo.rewards.geneval.reward import GenEvalReward, geneval_metrics
from flowgrpo.rewards.geneval.rules import (COLORS, TAGS, ColorClassifier, Detection, GenEvalResult, aggregate,
                                            crop_object, evaluate, filter_detections, per_tag_columns,
                                            relative_position)

__all__ = [
    "COCO_CLASSES", "COLORS", "ClipColorClassifier", "ColorClassifier", "Detection", "Detector", "GenEvalResult",
    "GenEvalReward", "Mask2FormerDetector", "TAGS", "aggregate", "coco_label_map", "crop_object", "evaluate",
    "filter_detections", "geneval_metrics", "per_tag_columns", "relative_position",
]
