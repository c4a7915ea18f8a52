"""icd.nn: the ICD method as framework-agnostic modules (docs/method.md 4).

Inputs are plain tensors: FPN feature lists [N, C, H_l, W_l], boxes (x1, y1, x2, y2) in
input pixels, labels 0..num_classes-1 and image sizes. ``ICDDistiller`` is the drop-in
module; the pieces it is built from are exported for reuse and testing.
"""

from icd.nn.aux_task import AuxiliaryTask, regression_targets
from icd.nn.boxes import unpack_boxes
from icd.nn.decoder import (
    AttentionResult,
    ConditionalDecoder,
    ConditionalDecoderLayer,
    DecoderLayerOutput,
    merge_heads,
    split_heads,
)
from icd.nn.distiller import LOSS_NAMES, ICDDistiller
from icd.nn.encoder import InstanceEncoder, centre_embedding, instance_descriptor, scale_indicator
from icd.nn.mlp import MLP
from icd.nn.prior import ClassPrior
from icd.nn.projection import LevelProjection
from icd.nn.sampler import InstanceBatch, InstanceSampler, instance_count, pad_instances, unpad_instances

__all__ = [
    "LOSS_NAMES",
    "MLP",
    "AttentionResult",
    "AuxiliaryTask",
    "ClassPrior",
    "ConditionalDecoder",
    "ConditionalDecoderLayer",
    "DecoderLayerOutput",
    "ICDDistiller",
    "InstanceBatch",
    "InstanceEncoder",
    "InstanceSampler",
    "LevelProjection",
    "centre_embedding",
    "instance_count",
    "instance_descriptor",
    "merge_heads",
    "pad_instances",
    "regression_targets",
    "scale_indicator",
    "split_heads",
    "unpack_boxes",
    "unpad_instances",
]
