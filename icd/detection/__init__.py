"""Detection: the detector families (``icd.detection.adapters``: the interface the engine reaches every
detector through, and its registry), torchvision's detectors on ResNet + FPN, the feature tap, COCO
evaluation."""

from icd.detection.feature_tap import FeatureTap, TappedBatch
from icd.detection.input_contract import check_same_input_transform
from icd.detection.models import DetectorSpec, build_detector, load_detector_weights

__all__ = [
    "DetectorSpec",
    "FeatureTap",
    "TappedBatch",
    "build_detector",
    "check_same_input_transform",
    "load_detector_weights",
]
