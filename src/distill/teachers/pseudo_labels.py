"""Pseudo-labels: a detection teacher's boxes on unlabelled images, computed once and stored.

On a transfer set (`data.transfer`) of detection images a student has no ground truth for its own
losses (and the FPN term's object mask has no boxes). The teacher's detections stand in: kept
above a score threshold, duplicates across classes removed by one class-agnostic NMS per image,
and written once to a safetensors file, so no training step runs the teacher's post-processing
(the pseudo-labels of self-training detectors: Sohn et al. 2020, "A Simple Semi-Supervised
Learning Framework for Object Detection", STAC). The file is fingerprinted by the teacher's
weights, the images and the settings, and a file that does not match is written again.

Boxes are stored in the coordinates of the image as the dataset reads it *before* its random
transforms; `PseudoLabelled` applies the dataset's `(image, target)` transforms (a flip) to the
image and its stored boxes together, as the labelled set applies them to its ground truth.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from distill.errors import ConfigError, DistillError
from distill.outputs import Batch

VERSION = 1


def keep_boxes(detections: Mapping[str, Tensor], score_threshold: float, iou: float) -> dict[str, Tensor]:
    """One image's pseudo-labels from its detections (`boxes` (N, 4) xyxy, `scores` (N,), `labels` (N,)):
    those scoring at least `score_threshold`, then class-agnostic NMS at `iou` (a detector's own
    NMS is per class, so one object may keep a box for each of two classes; the student's loss
    would then teach it both). Returns `boxes` float32, `labels` int64, `scores` float32."""
    from torchvision.ops import nms

    boxes = detections["boxes"].detach().float().cpu().reshape(-1, 4)
    scores = detections["scores"].detach().float().cpu().reshape(-1)
    labels = detections["labels"].detach().cpu().reshape(-1).long()
    keep = scores >= score_threshold
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # torchvision refuses empty boxes
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    order = nms(boxes, scores, iou)  # (kept indices, by decreasing score)
    return {"boxes": boxes[order], "labels": labels[order], "scores": scores[order]}


def raw_image(dataset: Any, i: int) -> Tensor:
    """Image `i` as the dataset reads it before its random transforms (`dataset.image(i)` when it
    has one, as `CocoDetection` does; else the first item of `dataset[i]`)."""
    if hasattr(dataset, "image"):
        return dataset.image(i)
    sample = dataset[i]
    return sample[0] if isinstance(sample, tuple | list) else sample


def pseudo_label(
    model: nn.Module,
    dataset: Any,
    adapter: Callable[[nn.Module, Batch], Any],
    score_threshold: float = 0.5,
    iou: float = 0.5,
    batch_size: int = 16,
    store: str | Path | None = None,
) -> list[dict[str, Tensor]]:
    """The teacher `model`'s pseudo-labels (`keep_boxes`) for every image of `dataset`, in order.

    `adapter` calls the detector with its post-processing and returns `extras["detections"]`
    (`distill.models.detection.DetectionAdapter()`, the recipe's teacher adapter). With `store`
    (a file path), the labels are read from it when this teacher made them on these images with
    these settings (`fingerprint`); else computed and written there first."""
    if not 0 <= score_threshold <= 1 or not 0 < iou <= 1:
        raise ConfigError(
            f"pseudo-labels need 0 <= score_threshold <= 1 and 0 < iou <= 1; got {score_threshold}, {iou}"
        )
    meta = fingerprint(model, dataset, score_threshold, iou) if store is not None else None
    stored = load_pseudo_labels(store, meta) if store is not None else None
    if stored is not None:
        return stored
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out: list[dict[str, Tensor]] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(dataset), batch_size):
                stop = min(start + batch_size, len(dataset))
                images = [raw_image(dataset, i).to(device) for i in range(start, stop)]
                dets = adapter(model, Batch(images, None)).extras.get("detections")
                if dets is None:
                    raise DistillError(
                        "the teacher's adapter gave no detections to take pseudo-labels from; use an "
                        "adapter that post-processes (distill.models.detection.DetectionAdapter)"
                    )
                out += [keep_boxes(d, score_threshold, iou) for d in dets]
    finally:
        model.train(was)
    if store is not None:
        save_pseudo_labels(store, out, meta)
    return out


def fingerprint(model: nn.Module, dataset: Any, score_threshold: float, iou: float) -> dict[str, Any]:
    """What the stored labels are a function of: the teacher's weights, the images, the settings."""
    from distill.teachers.store import _hash_item, weights_hash

    h = hashlib.sha256()
    n = len(dataset)
    for i in sorted({0, n // 2, n - 1}) if n else []:
        _hash_item(h, raw_image(dataset, i))
    return {
        "version": VERSION,
        "teacher": weights_hash(model),
        "images": n,
        "image_hash": h.hexdigest()[:16],
        "score_threshold": float(score_threshold),
        "iou": float(iou),
    }


def save_pseudo_labels(
    path: str | Path, labels: Sequence[Mapping[str, Tensor]], meta: dict[str, Any]
) -> None:
    """Writes `labels` (one dict per image) as one safetensors file: the boxes, labels and scores of
    every image concatenated, and `counts` (boxes per image); `meta` (the fingerprint) in its header."""
    from safetensors.torch import save_file

    from distill.checkpoint import atomic_write

    counts = torch.tensor([len(x["labels"]) for x in labels], dtype=torch.int64)
    tensors = {
        "boxes": torch.cat([x["boxes"].float().reshape(-1, 4) for x in labels])
        if labels
        else torch.zeros(0, 4),
        "labels": torch.cat([x["labels"].long().reshape(-1) for x in labels])
        if labels
        else torch.zeros(0).long(),
        "scores": torch.cat([x["scores"].float().reshape(-1) for x in labels]) if labels else torch.zeros(0),
        "counts": counts,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"pseudo_labels": json.dumps(meta)}))


def load_pseudo_labels(
    path: str | Path, meta: dict[str, Any] | None = None
) -> list[dict[str, Tensor]] | None:
    """The labels stored at `path`; None when there is no file, or its fingerprint is not `meta`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("pseudo_labels", "null"))
            if meta is not None and stored != json.loads(json.dumps(meta)):
                return None
            t = {k: f.get_tensor(k) for k in ("boxes", "labels", "scores", "counts")}
    except (OSError, ValueError, KeyError) as e:
        raise DistillError(f"{path} is not a pseudo-label file ({e}); delete it to write it again") from e
    out, at = [], 0
    for n in t["counts"].tolist():
        out.append({k: t[k][at : at + n] for k in ("boxes", "labels", "scores")})
        at += n
    return out


class PseudoLabelled(Dataset):
    """A detection dataset's images with stored pseudo-labels as their targets.

    Item `i` is `(image, target)`: `raw_image(dataset, i)` and `{"boxes", "labels", "scores"}` from
    `labels[i]`, both passed through `transforms` (default: the dataset's own `transforms`, e.g. a
    random flip), so the boxes follow the image as ground truth does."""

    def __init__(self, dataset: Any, labels: Sequence[Mapping[str, Tensor]], transforms: Any = "dataset"):
        if len(labels) != len(dataset):
            raise DistillError(
                f"{len(labels)} pseudo-labelled images for a dataset of {len(dataset)}; label them again"
            )
        self.dataset, self.labels = dataset, labels
        self.transforms = getattr(dataset, "transforms", None) if transforms == "dataset" else transforms

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]]:
        image = raw_image(self.dataset, i)
        target = {k: v.clone() for k, v in self.labels[i].items()}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
