"""Segmentation models: backbones, DeepLabV3+ and PSPNet heads, EMA teacher.

Quick start::

    from semiseg.models import build_model
    model = build_model("deeplabv3plus", "efficientnet_lite0", num_classes=11,
                        pretrained="imagenet")
    out = model(images)               # SegmentationOutput(logits, features, aux)
    clean, perturbed = model(images, perturb=True)   # UniMatch feature perturbation
"""

from semiseg.models.backbones import (
    BACKBONES,
    Backbone,
    BackboneFeatures,
    EfficientNetLite0Backbone,
    ResNetBackbone,
    TinyBackbone,
    build_backbone,
)
from semiseg.models.ema import ModelEMA
from semiseg.models.heads import ASPP, DeepLabV3PlusHead, HeadOutput, PSPNetHead, PyramidPooling
from semiseg.models.segmentor import MODELS, SegmentationModel, SegmentationOutput, build_model
from semiseg.models.weights import load_backbone_weights, read_state_dict

__all__ = [
    "ASPP",
    "BACKBONES",
    "MODELS",
    "Backbone",
    "BackboneFeatures",
    "DeepLabV3PlusHead",
    "EfficientNetLite0Backbone",
    "HeadOutput",
    "ModelEMA",
    "PSPNetHead",
    "PyramidPooling",
    "ResNetBackbone",
    "SegmentationModel",
    "SegmentationOutput",
    "TinyBackbone",
    "build_backbone",
    "build_model",
    "load_backbone_weights",
    "read_state_dict",
]
