"""Loss terms for distilling object detectors (read `distill.models.detection.DetectionAdapter` outputs).

- `detector_loss`: the student detector's own losses (classification, box regression, ...).
- `fpn_imitation`: FPN features of the student, through learned 1x1 adapters, regressed onto
  the teacher's, optionally only near ground-truth objects.
- `det_head_kd`: the teacher's per-location class probabilities as soft targets for the
  student's dense classification head (FCOS / RetinaNet, same head layout).

Pure torch; nothing here imports torchvision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import DistillError
from distill.losses.base import LossTerm, check_positive, check_range, reduce
from distill.outputs import Batch, Outputs
from distill.registry import LOSSES

_PREFIX = "backbone."


def _ordinary(t: Tensor) -> Tensor:
    """Inference-mode tensors (from a frozen teacher) cannot be saved for backward; a clone can."""
    return t.clone() if t.is_inference() else t


def box_mask(
    boxes: Sequence[Tensor], image_shape: Sequence[int], grid: Sequence[int], expand: float = 0.5
) -> Tensor:
    """Which cells of a feature grid lie near a ground-truth object.

    A cell is in the mask when its centre falls inside a box enlarged by `expand` times the box's
    width (height) on each side, or when it holds the box centre (so objects smaller than the
    stride still mark one cell). This is the region Wang et al. (2019) imitate, with a box margin
    in place of their anchor-IoU threshold.

    Args:
        boxes: per image, (N_i, 4) xyxy in the coordinates of the padded image the backbone saw.
        image_shape: (H, W) of that padded image.
        grid: (h, w) of the feature map.
        expand: margin as a fraction of the box size, >= 0.

    Returns:
        (B, h, w) float mask of 0/1.
    """
    H, W = image_shape
    h, w = grid
    device = boxes[0].device if len(boxes) else torch.device("cpu")
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * (H / h)  # (h,)
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * (W / w)  # (w,)
    masks = []
    for b in boxes:
        b = b.float().reshape(-1, 4)
        if b.numel() == 0:
            masks.append(torch.zeros(h, w, device=device))
            continue
        bw, bh = (b[:, 2] - b[:, 0]), (b[:, 3] - b[:, 1])
        x0, x1 = b[:, 0] - expand * bw, b[:, 2] + expand * bw
        y0, y1 = b[:, 1] - expand * bh, b[:, 3] + expand * bh
        inside_y = (ys[None, :] >= y0[:, None]) & (ys[None, :] <= y1[:, None])  # (N, h)
        inside_x = (xs[None, :] >= x0[:, None]) & (xs[None, :] <= x1[:, None])  # (N, w)
        m = (inside_y[:, :, None] & inside_x[:, None, :]).any(0)  # (h, w)
        cy = ((b[:, 1] + b[:, 3]) / 2 * h / H).long().clamp(0, h - 1)
        cx = ((b[:, 0] + b[:, 2]) / 2 * w / W).long().clamp(0, w - 1)
        m[cy, cx] = True
        masks.append(m.float())
    return torch.stack(masks)


def feature_imitation_loss(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-image squared error between (adapted) student and teacher features.

    Args:
        student, teacher: (B, C, h, w), same shape.
        mask: optional (B, h, w) weights; each image's error is averaged over its masked cells
            (an image with an empty mask contributes 0), else over all cells.

    Returns:
        (B,) mean over channels and (masked) cells of (student - teacher)^2, in fp32.
    """
    d = (student.float() - teacher.float()).pow(2).mean(1)  # (B, h, w)
    if mask is None:
        return d.flatten(1).mean(1)
    m = mask.float()
    return (d * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)


def sigmoid_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-element KL divergence between Bernoulli distributions, KL(p_t || p_s) * T^2.

    Dense detectors score each class at each location with an independent sigmoid, so the
    softmax KD of Hinton et al. becomes one binary KL per (location, class).

    Args:
        student_logits, teacher_logits: same shape, e.g. (B, A, K).
        temperature: T > 0; both sides are divided by T and the result scaled by T^2.

    Returns:
        Elementwise KL, same shape as the inputs, fp32, zero where the logits agree.
    """
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    p = torch.sigmoid(t)
    # BCE(s, p) - H(p) = KL(p || sigmoid(s)); both via logsigmoid for stability.
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl * temperature**2


@LOSSES.register("detector_loss")
class DetectorLoss(LossTerm):
    """The student detector's own training losses, summed: `Σ_k w_k · losses[k]`.

    Reads `student.extras["losses"]` (the dict a torchvision detector returns in train mode,
    e.g. `classification`, `bbox_regression`, `bbox_ctrness`), as `DetectionAdapter` stores it.

    Args:
        weights: optional per-component weights by name; components not named have weight 1.
    """

    needs_teacher = False

    def __init__(self, weights: Mapping[str, float] | None = None):
        super().__init__()
        self.component_weights = dict(weights or {})
        for k, v in self.component_weights.items():
            if not v >= 0:
                raise DistillError(f"detector_loss weight for '{k}' must be >= 0, got {v}")

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        losses = student.extras.get("losses")
        if not losses:
            raise DistillError(
                "the student produced no detector losses: call it with distill.models.detection.detection_adapter "
                "in train mode on batches with targets"
            )
        unknown = set(self.component_weights) - set(losses)
        if unknown:
            raise DistillError(
                f"detector_loss weights name {sorted(unknown)}, but the detector's losses are {sorted(losses)}"
            )
        return sum(self.component_weights.get(k, 1.0) * v.float() for k, v in losses.items())


def _levels(out: Outputs) -> dict[str, Tensor]:
    return {k[len(_PREFIX) :]: v for k, v in out.features.items() if k.startswith(_PREFIX) and v.dim() == 4}


@LOSSES.register("fpn_imitation")
class FPNImitation(LossTerm):
    """Feature imitation on FPN levels through learned 1x1 adapters.

    For each paired level `l`: `mean_cells mask · ‖A_l(S_l) − T_l‖² / C`, averaged over levels and
    images. `A_l` is a 1x1 convolution from the student's to the teacher's channels, created in
    `setup` from the first batch and trained with the student (Romero et al. 2015's regressor;
    Wang et al. 2019, "Distilling Object Detectors with Fine-grained Feature Imitation", for
    restricting it to the regions near objects, which keeps the background from dominating).

    Args:
        levels: FPN level names to imitate ("0", "1", "2", "p6", ...), as a list (same name on
            both sides) or a mapping student level -> teacher level. Default: every level name
            both sides have.
        mask: "gt" to imitate only cells near ground-truth boxes (see `box_mask`), "none" for
            every cell.
        expand: the box margin of the "gt" mask, as a fraction of the box size.

    Shapes: student levels (B, Cs, h, w), teacher levels (B, Ct, h', w'); a student level of
    another size is resized (bilinear) to the teacher's.
    """

    def __init__(
        self, levels: Sequence[str] | Mapping[str, str] | None = None, mask: str = "gt", expand: float = 0.5
    ):
        super().__init__()
        if mask not in ("gt", "none"):
            raise DistillError(f"fpn_imitation mask must be 'gt' or 'none', got '{mask}'")
        check_range("fpn_imitation expand", expand, 0.0, 10.0)
        if isinstance(levels, str):
            levels = [levels]
        self.pairs: dict[str, str] | None = (
            None
            if levels is None
            else dict(levels)
            if isinstance(levels, Mapping)
            else {name: name for name in levels}
        )
        self.mask = mask
        self.expand = float(expand)
        self.adapters = nn.ModuleDict()

    def _resolve(self, student: Outputs, teacher: Outputs) -> dict[str, str]:
        s, t = _levels(student), _levels(teacher)
        if not s or not t:
            side = "student" if not s else "teacher"
            raise DistillError(
                f"fpn_imitation found no FPN levels in the {side}'s features; use distill.models.detection's "
                "detection_adapter (student) and teacher_detection_adapter (teacher)"
            )
        pairs = self.pairs if self.pairs is not None else {k: k for k in s if k in t}
        missing = [f"student '{a}'" for a in pairs if a not in s] + [
            f"teacher '{b}'" for b in pairs.values() if b not in t
        ]
        if missing or not pairs:
            raise DistillError(
                f"fpn_imitation levels {', '.join(missing) or '(none shared)'} not found; student has "
                f"{', '.join(s)}, teacher has {', '.join(t)}"
            )
        return pairs

    def setup(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> None:
        if teacher is None:
            raise DistillError("fpn_imitation needs a teacher")
        pairs = self._resolve(student, teacher)
        s, t = _levels(student), _levels(teacher)
        self.pairs = pairs
        for a, b in pairs.items():
            conv = nn.Conv2d(s[a].shape[1], t[b].shape[1], kernel_size=1)
            self.adapters[a.replace(".", "_")] = conv.to(s[a].device)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        if teacher is None:
            raise DistillError("fpn_imitation needs a teacher")
        if self.pairs is None or not len(self.adapters):
            raise DistillError(
                "fpn_imitation has no adapters yet: the trainer calls setup() on a first batch"
            )
        s, t = _levels(student), _levels(teacher)
        per_level = []
        for a, b in self.pairs.items():
            sf = self.adapters[a.replace(".", "_")](s[a].float())
            tf = _ordinary(t[b]).float()
            if sf.shape[-2:] != tf.shape[-2:]:
                sf = F.interpolate(sf, size=tf.shape[-2:], mode="bilinear", align_corners=False)
            mask = None
            if self.mask == "gt":
                boxes = student.extras.get("gt_boxes")
                shape = student.extras.get("image_shape")
                if boxes is None or shape is None:
                    raise DistillError(
                        "fpn_imitation mask='gt' needs the ground-truth boxes the detection adapter records; "
                        "pass targets or use mask='none'"
                    )
                mask = box_mask(boxes, shape, tf.shape[-2:], self.expand)
            per_level.append(feature_imitation_loss(sf, tf, mask))
        per_sample = torch.stack(per_level).mean(0)  # (B,)
        return reduce(per_sample, batch.weights, "mean")


@LOSSES.register("det_head_kd")
class DenseHeadKD(LossTerm):
    """KD on a dense detector's classification head: binary KL per (location, class).

    `Σ_{a,k} KL(σ(t_ak/T) ‖ σ(s_ak/T)) · T² / N_obj`, normalised by the number of ground-truth
    objects in the batch (at least 1), as torchvision normalises its focal loss, so the term's
    scale matches the detector's classification loss. After Chen et al. (2017), "Learning
    Efficient Object Detection Models with Knowledge Distillation", with the sigmoid heads of
    FCOS / RetinaNet in place of a softmax.

    Args:
        temperature: T > 0.

    Shapes: `extras["cls_logits"]` (B, A, K) on both sides with identical A and K: the same head
    family, anchors per location, FPN strides and image size.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        check_positive("det_head_kd temperature", temperature)
        self.temperature = float(temperature)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        if teacher is None:
            raise DistillError("det_head_kd needs a teacher")
        s, t = student.extras.get("cls_logits"), teacher.extras.get("cls_logits")
        if s is None or t is None:
            side = "student" if s is None else "teacher"
            raise DistillError(
                f"det_head_kd: the {side} has no dense classification head output (extras['cls_logits']); "
                "it works for FCOS / RetinaNet pairs read by distill.models.detection's adapters"
            )
        if s.shape != t.shape:
            raise DistillError(
                f"det_head_kd: student head {tuple(s.shape)} and teacher head {tuple(t.shape)} differ; "
                "use the same head family, anchors, FPN strides, image size and num_classes on both sides"
            )
        kl = sigmoid_kd_loss(s, _ordinary(t), self.temperature)  # (B, A, K)
        per_sample = kl.flatten(1).sum(1)
        boxes = student.extras.get("gt_boxes")
        n_obj = sum(int(b.shape[0]) for b in boxes) if boxes is not None else s.shape[0]
        w = batch.weights
        total = (per_sample * w.reshape(-1).float()).sum() if w is not None else per_sample.sum()
        return total / max(1, n_obj)
