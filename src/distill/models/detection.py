"""Object detection: torchvision detectors as teacher and student, their adapter, and mAP.

The pieces a detection recipe needs, each small:

- `build_detector`: FCOS / RetinaNet / Faster R-CNN on a ResNet-FPN or MobileNetV3-FPN backbone,
  always with `weights=None` (nothing is downloaded). Every backbone returns FPN levels at strides
  8, 16, 32 (+ 64, 128 for the one-stage heads), so a ResNet teacher and a MobileNetV3 student of
  the same head family have identical head layouts and their classification outputs can be
  distilled location by location.
- `detection_adapter` / `DetectionAdapter`: `(model, batch) -> Outputs` with the FPN levels in
  `features` (`"backbone.0"`, `"backbone.1"`, ...), the detector's own loss dict in
  `extras["losses"]` (train mode), the dense head outputs (`extras["cls_logits"]`, ...), the
  detections (eval mode), and the resized ground-truth boxes that masked imitation needs.
- `DetectionEvaluator`: mAP and mAP@0.5 with torchmetrics' `MeanAveragePrecision`.

torchvision and torchmetrics are imported inside functions: `import distill` stays light.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import DistillError
from distill.outputs import Batch, Outputs

ARCHS = ("fcos", "retinanet", "fasterrcnn")
BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large")
_RESNET_CHANNELS = {"resnet18": (128, 256, 512), "resnet34": (128, 256, 512), "resnet50": (512, 1024, 2048)}


def _mobilenet_body(name: str) -> tuple[nn.Module, dict[str, str], list[int]]:
    """MobileNetV3 features with the last block at each of the strides 8, 16, 32 returned."""
    import torchvision

    # torchvision's MobileNetV3 BatchNorm momentum (0.01) suits long ImageNet runs; short runs from
    # scratch need running statistics that catch up within a few hundred steps.
    norm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.1)
    features = getattr(torchvision.models, name)(weights=None, norm_layer=norm).features
    return_layers, channels = {}, []
    x = torch.zeros(1, 3, 64, 64)
    last_at: dict[int, tuple[str, int]] = {}
    with torch.no_grad():
        for idx, block in features.named_children():
            x = block(x)
            last_at[64 // x.shape[-1]] = (idx, x.shape[1])
    for level, stride in enumerate((8, 16, 32)):
        idx, ch = last_at[stride]
        return_layers[idx] = str(level)
        channels.append(ch)
    # Drop the blocks past stride 32's last one: they would be computed and never used.
    last = max(int(i) for i in return_layers)
    body = nn.Sequential(*list(features.children())[: last + 1])
    return body, return_layers, channels


def build_backbone(name: str, fpn_channels: int = 128, extra: str = "p6p7") -> nn.Module:
    """A backbone + FPN returning levels "0", "1", "2" at strides 8, 16, 32, plus "p6", "p7"
    (`extra="p6p7"`, one-stage heads) or "pool" (`extra="pool"`, Faster R-CNN).

    Args:
        name: one of `BACKBONES`; built with `weights=None` (random initialisation).
        fpn_channels: channels of every FPN level (a multiple of 16: the FCOS head uses
            GroupNorm with min(32, fpn_channels / 2) groups).
        extra: which extra levels follow stride 32.
    """
    import torchvision
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    if name not in BACKBONES:
        raise DistillError(f"unknown detection backbone '{name}'; choose from {', '.join(BACKBONES)}")
    if fpn_channels % 16 or fpn_channels <= 0:
        raise DistillError(f"fpn_channels must be a positive multiple of 16, got {fpn_channels}")
    if name.startswith("resnet"):
        body = getattr(torchvision.models, name)(weights=None)
        return_layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
        channels = list(_RESNET_CHANNELS[name])
    else:
        body, return_layers, channels = _mobilenet_body(name)
    extra_block = LastLevelP6P7(fpn_channels, fpn_channels) if extra == "p6p7" else LastLevelMaxPool()
    return BackboneWithFPN(body, return_layers, channels, fpn_channels, extra_blocks=extra_block)


def build_detector(
    arch: str = "fcos",
    backbone: str = "resnet18",
    num_classes: int = 5,
    image_size: int = 64,
    fpn_channels: int = 128,
    head_convs: int = 4,
    anchor_scale: float = 1.0,
    score_thresh: float = 0.05,
    detections_per_img: int = 100,
) -> nn.Module:
    """A torchvision detector with random weights, sized for small images.

    Args:
        arch: "fcos" (anchor-free), "retinanet" or "fasterrcnn".
        backbone: one of `BACKBONES`.
        num_classes: including torchvision's background class 0 (COCO labels 1..K -> K + 1).
        image_size: the detector's resize target (`min_size = max_size = image_size`); square
            images of this size go through unscaled.
        fpn_channels: FPN width (the head runs at this width, so it dominates the cost).
        head_convs: conv layers per FCOS head tower (torchvision's default is 4).
        anchor_scale: RetinaNet / Faster R-CNN anchor sizes are `4 * stride * anchor_scale`;
            use 0.5 for objects much smaller than 32 pixels.
        score_thresh, detections_per_img: post-processing for evaluation.
    """
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
    from torchvision.ops import MultiScaleRoIAlign

    if arch not in ARCHS:
        raise DistillError(f"unknown detector arch '{arch}'; choose from {', '.join(ARCHS)}")
    if num_classes < 2:
        raise DistillError(f"num_classes counts the background class too; need >= 2, got {num_classes}")
    size = {"min_size": image_size, "max_size": image_size}
    strides = (8, 16, 32, 64, 128)
    if arch == "fcos":
        body = build_backbone(backbone, fpn_channels, "p6p7")
        head = FCOSHead(body.out_channels, 1, num_classes, num_convs=head_convs)
        if fpn_channels < 64:
            # torchvision's GroupNorm(32) leaves one channel per group below 64 channels, which fails
            # on the 1x1 top level of a single small image; two channels per group do not.
            norm = partial(nn.GroupNorm, fpn_channels // 2)
            head.classification_head = FCOSClassificationHead(
                fpn_channels, 1, num_classes, head_convs, norm_layer=norm
            )
            head.regression_head = FCOSRegressionHead(fpn_channels, 1, head_convs, norm_layer=norm)
        return FCOS(
            body,
            num_classes,
            head=head,
            score_thresh=score_thresh,
            detections_per_img=detections_per_img,
            **size,
        )
    if arch == "retinanet":
        body = build_backbone(backbone, fpn_channels, "p6p7")
        sizes = tuple(tuple(int(4 * s * anchor_scale * 2 ** (k / 3)) for k in range(3)) for s in strides)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        return RetinaNet(
            body,
            num_classes,
            anchor_generator=anchors,
            score_thresh=score_thresh,
            detections_per_img=detections_per_img,
            **size,
        )
    body = build_backbone(backbone, fpn_channels, "pool")
    sizes = tuple((int(4 * s * anchor_scale),) for s in strides[:4])
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    pool = MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2)
    return FasterRCNN(
        body,
        num_classes,
        rpn_anchor_generator=anchors,
        box_roi_pool=pool,
        box_score_thresh=score_thresh,
        box_detections_per_img=detections_per_img,
        **size,
    )


def _images_of(batch: Batch) -> list[Tensor]:
    x = batch.inputs
    if isinstance(x, Tensor):
        return list(x.unbind(0)) if x.dim() == 4 else [x]
    if isinstance(x, Sequence) and x and all(isinstance(v, Tensor) for v in x):
        return list(x)
    raise DistillError(
        "a detection batch's inputs must be a list of (3, H, W) image tensors or a (B, 3, H, W) tensor; "
        "use distill.data.coco.detection_collate as the loader's collate_fn"
    )


def _targets_to(targets: Any, device: torch.device) -> list[dict[str, Any]] | None:
    if targets is None:
        return None
    if not isinstance(targets, Sequence) or not all(isinstance(t, Mapping) for t in targets):
        raise DistillError(
            "detection targets must be a list of dicts with 'boxes' (N, 4) xyxy and 'labels' (N,); "
            "use distill.data.coco.CocoDetection with detection_collate"
        )
    out = []
    for t in targets:
        if "boxes" not in t or "labels" not in t:
            raise DistillError(f"a detection target has keys {sorted(t)}; it needs 'boxes' and 'labels'")
        out.append({k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()})
    return out


class DetectionAdapter:
    """Calls a torchvision detector on a batch and reads everything distillation needs.

    Args:
        postprocess: in eval mode, run the detector's post-processing (score threshold, NMS) and
            return `extras["detections"]`. A teacher only feeds losses, so `postprocess=False`
            stops after the head (cheaper); `teacher_detection_adapter` is that setting.

    Outputs:
        features: `"backbone.<level>"` -> (B, C, H_l, W_l) for every FPN level.
        extras: `"losses"` (train mode: the detector's loss dict), `"detections"` (eval mode with
            post-processing: list of dicts with boxes, scores, labels), `"cls_logits"` (B, A, K),
            `"bbox_regression"` (B, A, 4) and, for FCOS, `"bbox_ctrness"` (B, A, 1) from a dense
            head, where A is the number of anchors over all levels; `"image_shape"` (H, W) of the
            padded batch the backbone saw and `"gt_boxes"` (list of (N_i, 4)) in those coordinates.
    """

    def __init__(self, postprocess: bool = True):
        self.postprocess = postprocess

    def for_teaching(self) -> DetectionAdapter:
        """This adapter for a teacher whose outputs only feed losses: no post-processing (NMS);
        see `distill.adapters.teaching_adapter`, which the pipeline applies to the teacher."""
        return DetectionAdapter(postprocess=False)

    def __call__(self, model: nn.Module, batch: Batch) -> Outputs:
        for part in ("transform", "backbone"):
            if not hasattr(model, part):
                raise DistillError(
                    f"{type(model).__name__} has no .{part}: the detection adapter reads torchvision "
                    "detectors (FCOS, RetinaNet, Faster R-CNN); pass your own adapter for other models"
                )
        images = _images_of(batch)
        targets = _targets_to(batch.targets, images[0].device)
        seen: dict[str, Any] = {}

        def keep(name):
            def hook(_module, _inputs, output):
                seen[name] = output

            return hook

        head = getattr(model, "head", None)
        hooks = [model.transform.register_forward_hook(keep("transform"))]
        hooks.append(model.backbone.register_forward_hook(keep("backbone")))
        if isinstance(head, nn.Module):
            hooks.append(head.register_forward_hook(keep("head")))
        extras: dict[str, Any] = {}
        try:
            if model.training:
                if targets is None:
                    raise DistillError(
                        "a detector in train mode needs targets (boxes, labels) in the batch to compute its losses"
                    )
                extras["losses"] = model(images, targets)
            elif self.postprocess:
                extras["detections"] = model(images)
            else:
                image_list, _ = model.transform(images)
                feats = model.backbone(image_list.tensors)
                if isinstance(head, nn.Module):
                    head(list(feats.values()))
        finally:
            for h in hooks:
                h.remove()
        image_list, resized = seen["transform"]
        extras["image_shape"] = tuple(image_list.tensors.shape[-2:])
        if resized is not None:
            extras["gt_boxes"] = [t["boxes"] for t in resized]
        elif targets is not None:
            # Eval mode does not resize targets; scale them the way the transform scaled the images.
            extras["gt_boxes"] = [
                _scale_boxes(t["boxes"], img.shape[-2:], new)
                for t, img, new in zip(targets, images, image_list.image_sizes)
            ]
        if "head" in seen and isinstance(seen["head"], Mapping):
            extras.update({k: v for k, v in seen["head"].items() if isinstance(v, Tensor)})
        features = {f"backbone.{k}": v for k, v in seen["backbone"].items()}
        return Outputs(logits=None, features=features, extras=extras)


def _scale_boxes(boxes: Tensor, old: Sequence[int], new: Sequence[int]) -> Tensor:
    ry, rx = new[0] / old[0], new[1] / old[1]
    return boxes * torch.tensor([rx, ry, rx, ry], dtype=boxes.dtype, device=boxes.device)


detection_adapter = DetectionAdapter(postprocess=True)
teacher_detection_adapter = DetectionAdapter(postprocess=False)


class DetectionEvaluator:
    """COCO mAP of the student's detections: `reset()`, `update(student, teacher, batch)`, `compute()`.

    `compute()` returns `{"map", "map_50", "map_75", "mar_100"}` (floats in [0, 1]) from
    torchmetrics' `MeanAveragePrecision` with the pycocotools backend. The student's outputs
    must come from `detection_adapter` in eval mode (they carry `extras["detections"]`).
    """

    names = ("map", "map_50", "map_75", "mar_100")

    def __init__(self):
        self.metric = None
        self.reset()

    def reset(self) -> None:
        try:
            from torchmetrics.detection import MeanAveragePrecision
        except ImportError as e:  # pragma: no cover - depends on the install
            raise DistillError(
                "detection mAP needs torchmetrics and pycocotools: pip install distill[vision]"
            ) from e
        self.metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")

    def update(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> None:
        dets = student.extras.get("detections")
        if dets is None:
            raise DistillError(
                "no detections to score: evaluate in eval mode with distill.models.detection.detection_adapter"
            )
        if batch.targets is None:
            raise DistillError("mAP needs ground-truth boxes: the evaluation batches carry no targets")
        preds = [{k: d[k].detach().cpu() for k in ("boxes", "scores", "labels")} for d in dets]
        gts = [{"boxes": t["boxes"].cpu(), "labels": t["labels"].cpu()} for t in batch.targets]
        self.metric.update(preds, gts)

    def compute(self) -> dict[str, float]:
        res = self.metric.compute()
        return {k: float(res[k]) for k in self.names}


def evaluate_detector(model: nn.Module, loader, device: str | torch.device = "cpu") -> dict[str, float]:
    """mAP of `model` over `loader` (batches from `detection_collate`)."""
    from distill.outputs import as_batch

    was_training = model.training
    model.eval()
    ev = DetectionEvaluator()
    with torch.inference_mode():
        for raw in loader:
            batch = as_batch(raw)
            batch = Batch([x.to(device) for x in _images_of(batch)], batch.targets, raw=raw)
            ev.update(detection_adapter(model, batch), None, batch)
    model.train(was_training)
    return ev.compute()
