"""STPG: a dual mean teacher with a professional and a general module, pixel selection and
dual contrastive learning with anchors (the STPG paper, Sec. 3; `semiseg.pseudo.stpg`).

Networks: Gen-Student (`student`, evaluated) and Pro-Student (`student_pro`), differently
initialised; Gen-Teacher and Pro-Teacher are their EMAs (`scheme.teacher_decay`, warmed up
as min(1 - 1/(step+1), decay)). The professional module trains Pro-Student on Gen-Teacher's
pseudo labels of the selected pixels (Eq. 6-7); the general module trains Gen-Student on all
of Pro-Teacher's pseudo labels (Eq. 11); both are weighted by the teacher's confidence.
Students see the strong view with CutMix (as mean teacher here), teachers the weak views in
eval mode; the pseudo labels of the two source batches are pasted with the same box.

Choices the paper leaves open (see METHODS): the confusion matrix is built per mini-batch
from Pro-Student's strong-view prediction and Gen-Teacher's weak-view pseudo label on valid
pixels; prototypes are EMAs of the Gen-Teacher projections of labeled pixels (by ground
truth) from the first step, and anchors are matched to them from `scheme.match_after` steps
on (re-matched every step); the contrastive losses (Eq. 15-16) apply to a random subset of
labeled pixels of both students; the memory bank takes, per class and step, the
`stpg.bank_topk` Gen-Teacher projections of labeled pixels with confidence >= phi that lie
closest to their class's anchor. Policies other than `pseudo_label` multiply their weights
into both modules' confidence weights, and the unlabeled loss (`loss.name`) is the one both
modules learn through (FPL's fuzzy positive sets included). The projection head exists only
when the contrastive losses are on (`lambda_ctr > 0`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.distributed import all_gather_pairs
from semiseg.labels import IGNORE_INDEX
from semiseg.models.ema import ModelEMA
from semiseg.models.segmentor import SegmentationOutput
from semiseg.pseudo import PseudoLabels
from semiseg.pseudo.memory import FeatureBank
from semiseg.pseudo.stpg import (
    anchor_contrastive_loss,
    ema_prototypes,
    match_anchors,
    mismatch_parts,
    mismatch_scores,
    optimize_anchors,
    selection_mask,
    similarity_loss,
)
from semiseg.schemes.base import EvalEMAOptions, StepOutput, Views, unwrap
from semiseg.schemes.semi import SemiOptions, SemiScheme, TeacherDecayOptions, paste
from semiseg.schemes.teaching import Teaching

PROJECTION_DIM = 256


@dataclass
class STPGOptions(SemiOptions, EvalEMAOptions, TeacherDecayOptions):
    name: str = "stpg"
    selection: Literal["cons", "cons+lmis", "cons+hmis", "all"] = "cons+hmis"
    """Gen-Teacher pixels that teach Pro-Student (Table 5): the method is cons+hmis; all = no selection (DM)."""
    lambda_u: float = 1.0
    """Weight of the two unlabeled losses (Eq. 17)."""
    lambda_ctr: float = 0.1
    """Weight of the anchor contrastive and similarity losses (Eq. 17); 0 turns DCL off."""
    tau: float = 0.5
    """Temperature of the anchor losses (Eq. 12, 15)."""
    alpha: float = 0.99
    """EMA momentum of the class prototypes (Eq. 13)."""
    phi: float = 0.95
    """Gen-Teacher confidence a labeled pixel needs to enter the memory bank."""
    bank_size: int = 256
    """Features per class in the memory bank (N)."""
    bank_topk: int = 32
    """Proximity-guided sampling: per class and step, the K confident features closest to their anchor enter the bank."""
    match_after: int = 100
    """Steps of prototype EMA before anchors are matched (Hungarian) and the contrastive losses start."""
    anchor_steps: int = 2000
    """Adam steps that spread the anchors (Eq. 12) once, before training."""
    contrast_pixels: int = 2048
    """Labeled pixels per student and step in the contrastive losses (a random subset, for memory)."""

    def validate(self) -> None:
        super().validate()
        self.positive("tau", "bank_size", "bank_topk", "anchor_steps", "contrast_pixels")
        self.require(self.lambda_u >= 0, "lambda_u", "must be >= 0")
        self.require(self.lambda_ctr >= 0, "lambda_ctr", "must be >= 0")
        self.require(self.match_after >= 0, "match_after", "must be >= 0")
        self.decay("alpha")
        self.probability("phi")


def _grid(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resampling of [B,H,W] maps (labels or confidences) to `size`, dtype kept."""
    return F.interpolate(maps[:, None].float(), size=size, mode="nearest")[:, 0].to(maps.dtype)


class STPGScheme(SemiScheme):
    """L = L_s + lambda_u (L_u^Gen + L_u^Pro) + lambda_ctr (L_ac + L_sim) (Eq. 17)."""

    name = "stpg"
    Options = STPGOptions
    summary = "Gen- and Pro-Student with EMA teachers, pixel selection by class mismatch, anchor contrastive losses (STPG)"
    model_names = ("student", "student_pro")
    views = Views(strong=1, boxes=1)
    options: STPGOptions

    @classmethod
    def projection_dim(cls, options: STPGOptions) -> int | None:
        return PROJECTION_DIM if options.lambda_ctr > 0 else None

    @classmethod
    def may_leave_unused(cls, options: STPGOptions, model: nn.Module) -> bool:
        # The projection heads get their first gradient when the contrastive losses start.
        return options.lambda_ctr > 0 and options.match_after > 0

    def __init__(
        self,
        cfg: Any,
        models: dict[str, nn.Module],
        num_classes: int,
        teaching: Teaching | None = None,
    ):
        super().__init__(cfg, models, num_classes, teaching)
        st = self.options
        self.teachers = {
            name: ModelEMA(unwrap(models[name]), st.teacher_decay) for name in self.model_names
        }
        self.contrastive = st.lambda_ctr > 0
        self.anchors = (
            optimize_anchors(num_classes, PROJECTION_DIM, st.tau, st.anchor_steps, cfg.train.seed)
            if self.contrastive
            else None
        )
        self.prototypes = torch.zeros(num_classes, PROJECTION_DIM)
        self.seen = torch.zeros(num_classes, dtype=torch.bool)
        self.sigma: Tensor | None = None
        self.bank = FeatureBank(num_classes, PROJECTION_DIM, size=st.bank_size)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.gather = all_gather_pairs if distributed else None

    def training_step(
        self, labeled: dict, unlabeled: dict | None, mix: dict | None, iteration: int
    ) -> StepOutput:
        assert unlabeled is not None and mix is not None
        u, st, teaching = unlabeled, self.options, self.teaching
        x, y = labeled["image"], labeled["mask"]
        n_x, n_u = x.shape[0], u["image"].shape[0]
        with torch.no_grad():
            teacher_out = {
                name: teacher.module(torch.cat([x, u["image"], mix["image"]]))
                for name, teacher in self.teachers.items()
            }
        strong = paste(u["strong1"], mix["strong1"], u["box1"])
        contrast_now = self.contrastive and iteration >= st.match_after
        student_out = {
            name: self.models[name](torch.cat([x, strong]), train_projection=contrast_now)
            for name in self.model_names
        }
        valid = paste(u["valid"], mix["valid"], u["box1"])

        # Pseudo labels of each teacher on the weak views, pasted like the strong view.
        labels = {}
        for name, out in teacher_out.items():
            weak, weak_mix = out.rows(slice(n_x, n_x + n_u)), out.rows(slice(n_x + n_u, None))
            pl, pl_mix = teaching.label(weak, u, weak_mix, mix)
            labels[name] = pl.pasted(pl_mix, u["box1"])
        teaching.observe(student_out["student"].rows(slice(None, n_x)), y)

        losses = {
            f"loss_x_{name}": self.labeled_loss(out.logits[:n_x], y)
            for name, out in student_out.items()
        }
        # General module (Eq. 11): Gen-Student learns every Pro-Teacher pseudo label.
        general = labels["student_pro"]
        losses["loss_u_gen"] = self._weighted(
            student_out["student"].logits[n_x:], general, valid, valid
        )
        # Professional module (Eq. 5-7): Pro-Student learns the selected Gen-Teacher labels.
        professional = labels["student"]
        pro_logits = student_out["student_pro"].logits[n_x:]
        pred_pro = pro_logits.detach().argmax(dim=1).masked_fill(~valid, IGNORE_INDEX)
        scores = mismatch_scores(pred_pro, professional.target, self.num_classes)
        chosen = selection_mask(pred_pro, professional.target, scores, st.selection)
        losses["loss_u_pro"] = self._weighted(pro_logits, professional, valid & chosen, valid)
        teaching.learn_from_student(student_out["student"].features[n_x:], general, valid)
        losses.update(teaching.combine({k: losses[k] for k in ("loss_u_gen", "loss_u_pro")}))
        total = sum(losses[f"loss_x_{n}"] for n in self.model_names) + st.lambda_u * (
            losses["loss_u_gen"] + losses["loss_u_pro"]
        )

        oracle = u.get("oracle_mask")
        if oracle is not None:
            # The pasted source batch has no ground truth.
            oracle = oracle.masked_fill(u["box1"] | ~valid, IGNORE_INDEX)
        logs = teaching.diagnostics(professional, valid, oracle)
        logs.update(self._selection_logs(pred_pro, professional.target, scores, valid))
        if self.contrastive:
            ctr = self._contrastive(teacher_out["student"], student_out, y, n_x, iteration)
            losses.update(ctr)
            total = total + st.lambda_ctr * sum(ctr.values())
        logs.update({k: v.detach() for k, v in losses.items()})
        return StepOutput(total, logs)

    def _weighted(self, logits: Tensor, pl: PseudoLabels, mask: Tensor, valid: Tensor) -> Tensor:
        """Confidence-weighted unlabeled loss (Eq. 7, 11) on the pixels of `mask`, divided by
        the view's valid pixels (as every unlabeled loss here)."""
        return self.teaching.loss(logits, pl.reweighted(pl.weight * pl.confidence * mask), valid)

    def _selection_logs(
        self, pred_student: Tensor, pred_teacher: Tensor, scores: Tensor, valid: Tensor
    ) -> dict[str, Tensor]:
        consistent, high, low = mismatch_parts(
            pred_student, pred_teacher.masked_fill(~valid, IGNORE_INDEX), scores
        )
        known = (consistent | high | low).sum().clamp(min=1)
        logs = {
            "stpg/share_consistent": consistent.sum() / known,
            "stpg/share_high_mismatch": high.sum() / known,
            "stpg/share_low_mismatch": low.sum() / known,
        }
        logs.update({f"stpg/mismatch/{c}": scores[c] for c in range(self.num_classes)})
        return logs

    def _contrastive(
        self,
        gen_teacher: SegmentationOutput,
        students: dict[str, SegmentationOutput],
        y: Tensor,
        n_x: int,
        iteration: int,
    ) -> dict[str, Tensor]:
        """Eq. 13-16 on labeled pixels: prototype EMA and matching from Gen-Teacher
        projections, the proximity-guided bank, and both students' anchor/similarity losses."""
        st = self.options
        assert self.anchors is not None
        teacher_proj = gen_teacher.projection[:n_x]
        size = tuple(teacher_proj.shape[-2:])
        labels = _grid(y, size)
        known = labels != IGNORE_INDEX
        conf = _grid(gen_teacher.logits[:n_x].detach().float().softmax(1).amax(1), size)
        t_feat = F.normalize(teacher_proj.permute(0, 2, 3, 1)[known].float(), dim=1).cpu()
        t_lab = labels[known].cpu()
        t_conf = conf[known].cpu()
        if self.gather is not None:
            # Every process updates prototypes and bank from all processes' pixels, so their
            # states (and the anchor matching) stay identical.
            packed, t_lab = self.gather(torch.cat([t_feat, t_conf[:, None]], dim=1), t_lab)
            t_feat, t_conf = packed[:, :-1], packed[:, -1]
        self.prototypes, self.seen = ema_prototypes(
            self.prototypes, t_feat, t_lab, st.alpha, self.seen
        )
        zero = teacher_proj.sum() * 0.0
        if iteration < st.match_after:
            return {"loss_ac": zero, "loss_sim": zero}
        # Unseen classes keep a zero prototype; the matching still gives them a free anchor.
        self.sigma = match_anchors(self.prototypes, self.anchors)
        self._push_bank(t_feat, t_lab, t_conf >= st.phi)
        # The bank holds unit vectors, so the mean over its entries of 1 - cos (Eq. 16) is
        # 1 - f_hat . (their plain mean); normalising that mean would rescale the loss.
        bank_means, bank_valid = self.bank.prototypes()
        anchors = self.anchors.to(teacher_proj.device)
        sigma = self.sigma.to(teacher_proj.device)
        means, valid = bank_means.to(teacher_proj.device), bank_valid.to(teacher_proj.device)
        loss_ac, loss_sim = zero, zero
        for out in students.values():
            proj = out.projection[:n_x]
            feats = proj.permute(0, 2, 3, 1)[known]
            lab = labels[known]
            if feats.shape[0] > st.contrast_pixels:
                pick = torch.randperm(feats.shape[0], device=feats.device)[: st.contrast_pixels]
                feats, lab = feats[pick], lab[pick]
            loss_ac = loss_ac + anchor_contrastive_loss(feats.float(), lab, anchors, sigma, st.tau)
            loss_sim = loss_sim + similarity_loss(feats.float(), lab, means, valid)
        return {"loss_ac": loss_ac, "loss_sim": loss_sim}

    def _push_bank(self, features: Tensor, labels: Tensor, confident: Tensor) -> None:
        """Proximity-guided sampling: per class, the `bank_topk` confident features closest to
        the class's anchor enter its FIFO queue."""
        assert self.anchors is not None and self.sigma is not None
        features, labels = features[confident], labels[confident]
        chosen = []
        for c in labels.unique().tolist():
            where = torch.nonzero(labels == c).flatten()
            distance = (features[where] - self.anchors[self.sigma[c]]).norm(dim=1)
            chosen.append(where[distance.argsort()[: self.options.bank_topk]])
        if chosen:
            index = torch.cat(chosen)
            self.bank.push(features[index], labels[index])

    def after_optimizer_step(self, iteration: int) -> None:
        super().after_optimizer_step(iteration)
        for name, teacher in self.teachers.items():
            teacher.update(self.models[name], iteration)

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "teachers": {name: t.state_dict() for name, t in self.teachers.items()},
            "anchors": self.anchors,
            "prototypes": self.prototypes,
            "seen": self.seen,
            "sigma": self.sigma,
            "bank": self.bank.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for name, teacher in self.teachers.items():
            teacher.load_state_dict(state["teachers"][name])
        self.anchors, self.prototypes, self.seen, self.sigma = (
            state["anchors"],
            state["prototypes"],
            state["seen"],
            state["sigma"],
        )
        self.bank.load_state_dict(state["bank"])
