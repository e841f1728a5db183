"""The segmentation model every scheme trains, and ``build_model``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from semiseg.models.backbones import Backbone, BackboneFeatures, build_backbone
from semiseg.models.heads import DeepLabV3PlusHead, PSPNetHead
from semiseg.models.weights import load_backbone_weights

MODELS = ("deeplabv3plus", "pspnet")


@dataclass
class SegmentationOutput:
    """What a :class:`SegmentationModel` returns for an input [B, 3, H, W].

    Attributes:
        logits: [B, C, H, W], bilinearly upsampled (align_corners=False) to the input size.
        features: [B, D, h, w], the decoder's last feature map before the 1x1 classifier
            (after ReLU), at decoder resolution (H/4 for DeepLabV3+, H/os for PSPNet).
        aux: [B, C, H, W] auxiliary logits (PSPNet's stage-3 head, training mode only),
            otherwise None.
    """

    logits: Tensor
    features: Tensor
    aux: Tensor | None = None
    projection: Tensor | None = None
    """[B, P, h, w] output of the projection head (contrastive schemes), else None."""

    def rows(self, index: slice) -> SegmentationOutput:
        """The outputs of part of the batch (e.g. the labeled images of a joint forward pass)."""
        return SegmentationOutput(
            self.logits[index],
            self.features[index],
            None if self.aux is None else self.aux[index],
            None if self.projection is None else self.projection[index],
        )


class SegmentationModel(nn.Module):
    """Backbone + decoder head.

    Attributes:
        backbone: the encoder (parameters at the base learning rate).
        head: the decoder and classifier(s) (parameters usually at 10x the learning rate).
        num_classes: C.
        feature_dim: D, channels of ``SegmentationOutput.features``.
    """

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        num_classes: int,
        projection_dim: int | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.feature_dim: int = head.feature_dim
        self.feature_dropout = nn.Dropout2d(0.5)
        self.channels_last = False
        # STPG's projection head: Conv-ReLU-Dropout-Conv on the decoder features.
        self.projector = (
            nn.Sequential(
                nn.Conv2d(self.feature_dim, self.feature_dim, 1),
                nn.ReLU(inplace=True),
                nn.Dropout2d(0.1),
                nn.Conv2d(self.feature_dim, projection_dim, 1),
            )
            if projection_dim
            else None
        )

    def forward(
        self, x: Tensor, perturb: bool = False, train_projection: bool = True
    ) -> SegmentationOutput | tuple[SegmentationOutput, SegmentationOutput]:
        """Segment ``x`` [B, 3, H, W].

        With ``perturb=True``, UniMatch's feature perturbation: every encoder feature map is
        concatenated along the batch with a copy passed through ``Dropout2d(0.5)``, the 2B
        batch is decoded at once (so BatchNorm sees both halves, as in UniMatch), and the
        result is split into ``(clean, perturbed)``, each for B images. Dropout is only
        active in training mode; in eval mode both outputs are equal.

        ``train_projection=False`` computes the projection without gradient, for a step whose
        loss does not use it (STPG before its contrastive losses start): its parameters are
        then outside the step's graph, as DDP needs, and its dropout still draws as usual.
        """
        size = x.shape[-2:]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.backbone(x)
        if not perturb:
            return self._decode(feats, size, train_projection)
        # All three maps are perturbed so that any head sees a consistent 2B batch; the
        # DeepLabV3+ head reads low and high, PSPNet high (and mid for its auxiliary head).
        doubled = BackboneFeatures(*(torch.cat([f, self.feature_dropout(f)]) for f in feats))
        out = self._decode(doubled, size, train_projection)
        b = x.shape[0]
        return out.rows(slice(0, b)), out.rows(slice(b, None))

    def _decode(
        self, feats: BackboneFeatures, size: torch.Size, train_projection: bool = True
    ) -> SegmentationOutput:
        head_out = self.head(feats)
        aux = None if head_out.aux is None else _resize(head_out.aux, size)
        projection = None
        if self.projector is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and train_projection):
                projection = self.projector(head_out.features)
        return SegmentationOutput(
            _resize(head_out.logits, size), head_out.features, aux, projection
        )

    def to_channels_last(self) -> SegmentationModel:
        """Weights and inputs in channels-last layout (faster convolutions on CPUs and on
        GPUs with tensor cores); outputs keep the shape they have."""
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    @property
    def has_aux_head(self) -> bool:
        """The decoder has an auxiliary head (PSPNet), trained only by schemes that give it a loss."""
        return hasattr(self.head, "aux_head")

    def aux_head_names(self) -> list[str]:
        """Qualified names of the auxiliary head's parameters and buffers (empty without one)."""
        if not self.has_aux_head:
            return []
        return [
            n
            for n, _ in [*self.named_parameters(), *self.named_buffers()]
            if n.startswith("head.aux_head.")
        ]

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Encoder parameters (base learning rate)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Decoder, classifier and projection-head parameters; disjoint from
        ``backbone_parameters`` and together all parameters of the model."""
        yield from self.head.parameters()
        if self.projector is not None:
            yield from self.projector.parameters()


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _resize(t: Tensor, size: torch.Size) -> Tensor:
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def build_model(
    name: str,
    backbone: str,
    num_classes: int,
    pretrained: str | None = None,
    output_stride: int = 16,
    projection_dim: int | None = None,
    decoder: str = "standard",
    decoder_channels: int = 256,
) -> SegmentationModel:
    """Build a segmentation model.

    Args:
        name: 'deeplabv3plus' or 'pspnet'.
        backbone: 'resnet50', 'resnet101', 'efficientnet_lite0' or 'tiny' (a small random
            CNN for tests and debugging).
        num_classes: C, the number of classes (without the ignore index).
        pretrained: backbone weights, see :mod:`semiseg.models.weights` (None: random;
            'imagenet'; a torchvision weight name; a local file path). The head is always
            randomly initialised.
        output_stride: 16 or 8; ASPP rates are (6, 12, 18) at 16 and doubled at 8.
        projection_dim: add a projection head (Conv-ReLU-Dropout-Conv) from the decoder
            features to this many channels (``SegmentationOutput.projection``; STPG: 256).
        decoder: DeepLabV3+ only: 'standard' or 'light' (depthwise-separable 3x3
            convolutions in ASPP and the decoder).
        decoder_channels: DeepLabV3+ only: channels of ASPP and the decoder (256).

    Raises:
        ValueError: unknown model or backbone name, output stride not 8/16, num_classes < 1.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    encoder = build_backbone(backbone, output_stride)
    if pretrained is not None:
        load_backbone_weights(encoder, pretrained)
    if decoder not in ("standard", "light"):
        raise ValueError(f"unknown decoder {decoder!r}; valid: standard, light")
    if name == "deeplabv3plus":
        rates = tuple(r * 16 // output_stride for r in (6, 12, 18))
        head = DeepLabV3PlusHead(
            encoder.low_channels,
            encoder.high_channels,
            num_classes,
            rates,
            channels=decoder_channels,
            separable=decoder == "light",
        )
    else:
        if decoder != "standard" or decoder_channels != 256:
            raise ValueError("decoder and decoder_channels shape the DeepLabV3+ decoder only")
        head = PSPNetHead(encoder.mid_channels, encoder.high_channels, num_classes)
    return SegmentationModel(encoder, head, num_classes, projection_dim)
