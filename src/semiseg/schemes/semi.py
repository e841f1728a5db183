"""What the semi-supervised schemes share: pseudo labels through a policy, CutMix, diagnostics.

Batches (see `semiseg.data.transforms.UnlabeledTransform`): `labeled` has image [B,3,h,w]
and mask [B,h,w]; `unlabeled` and `mix` (the CutMix-source batch, drawn independently as
in UniMatch) have the weak view `image`, strong views `strong1`/`strong2`, CutMix boxes
`box1`/`box2` and `valid` (False on padding), and `oracle_mask` only under
`scheme.oracle_eval`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from semiseg.config import Config
from semiseg.losses import weighted_cross_entropy
from semiseg.pseudo import Policy, PseudoLabels
from semiseg.schemes.base import Scheme


def paste(base: Tensor, source: Tensor, box: Tensor) -> Tensor:
    """CutMix: `source` inside `box` [B,h,w], `base` elsewhere; works for [B,h,w] and [B,C,h,w]."""
    if base.dim() == 4:
        box = box[:, None]
    return torch.where(box, source, base)


class SemiScheme(Scheme):
    """Base of schemes that learn from unlabeled images through a pseudo-label policy."""

    uses_unlabeled: ClassVar[bool] = True

    def __init__(self, cfg: Config, models: dict[str, nn.Module], num_classes: int, policy: Policy | None):
        super().__init__(cfg, models, num_classes, policy)
        if policy is None:
            raise ValueError(f"scheme {cfg.scheme.name!r} needs a pseudo-label policy")
        self.policy: Policy = policy

    def label(self, probs: Tensor, valid: Tensor, probs_mix: Tensor, valid_mix: Tensor) -> tuple[PseudoLabels, PseudoLabels]:
        """One policy call on the batch and its CutMix source, so statistics see both at once."""
        both = self.policy(torch.cat([probs, probs_mix]), torch.cat([valid, valid_mix]))
        n = probs.shape[0]
        first = PseudoLabels(both.target[:n], both.weight[:n], both.confidence[:n])
        second = PseudoLabels(both.target[n:], both.weight[n:], both.confidence[n:])
        return first, second

    @staticmethod
    def mixed(pl: PseudoLabels, pl_mix: PseudoLabels, box: Tensor) -> PseudoLabels:
        return PseudoLabels(
            paste(pl.target, pl_mix.target, box),
            paste(pl.weight, pl_mix.weight, box),
            paste(pl.confidence, pl_mix.confidence, box),
        )

    def cutmix_loss(
        self, logits: Tensor, pl: PseudoLabels, pl_mix: PseudoLabels, valid: Tensor, valid_mix: Tensor, box: Tensor
    ) -> Tensor:
        """Unlabeled loss of a CutMix view: targets, weights and valid pixels pasted with `box`."""
        target = self.mixed(pl, pl_mix, box)
        valid_view = paste(valid, valid_mix, box)
        return weighted_cross_entropy(logits, target.target, target.weight * valid_view, valid_view)

    def diagnostics(self, pl: PseudoLabels, valid: Tensor, oracle: Tensor | None) -> dict[str, Tensor | float]:
        """Fraction of valid pixels used, their mean weight, the policy's own scalars and, under
        oracle_eval, the accuracy of used and of discarded pseudo labels."""
        valid_f = valid.float()
        n_valid = valid_f.sum().clamp(min=1)
        used = (pl.weight > 0) & valid
        logs: dict[str, Tensor | float] = {
            "mask_ratio": used.float().sum() / n_valid,
            "mean_weight": (pl.weight * valid_f).sum() / n_valid,
            "mean_confidence": (pl.confidence * valid_f).sum() / n_valid,
        }
        logs.update({f"policy/{k}": v for k, v in self.policy.diagnostics().items()})
        if oracle is not None:
            known = valid & (oracle != 255)
            correct = pl.target == oracle
            for name, part in (("used", used & known), ("discarded", ~used & known)):
                # NaN marks "no such pixels in this batch"; the logger keeps it out of TensorBoard.
                count = part.float().sum()
                logs[f"oracle/acc_{name}"] = (correct & part).float().sum() / count if count > 0 else float("nan")
        return logs

    def state_dict(self) -> dict:
        return {**super().state_dict(), "policy": self.policy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.policy.load_state_dict(state["policy"])


def softmax(logits: Tensor) -> Tensor:
    return logits.detach().float().softmax(dim=1)
