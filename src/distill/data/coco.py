"""A COCO-format detection dataset and the collate function detection batches need.

Reads any folder of images plus a COCO `annotations.json` (a user's real set, or the shapes set
from `distill.data.shapes`) the way torchvision's detection models want it: a float image tensor
(3, H, W) in [0, 1] and a target dict with `boxes` (N, 4) in (x0, y0, x1, y1) pixels and `labels`
(N,) int64. pycocotools is not needed to read; the JSON is parsed directly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.errors import DistillError


class CocoDetection(torch.utils.data.Dataset):
    """Images and box targets from a COCO-format annotation file.

    Args:
        images: folder the `file_name` entries are relative to.
        annotations: path of the COCO JSON (`images`, `annotations`, `categories`).
        transforms: optional `(image, target) -> (image, target)` applied after loading.
        contiguous_labels: map category ids to 1..K in the order of `categories` (class 0 stays
            free for torchvision's background convention). With False the raw ids are used.
        skip_crowd: drop `iscrowd` annotations (they are regions, not instances).

    Item `i` is `(image, target)`: `image` (3, H, W) float32 in [0, 1]; `target` has `boxes`
    (N, 4) float32 xyxy, `labels` (N,) int64, `image_id` (int), `area` (N,), `iscrowd` (N,).
    Boxes with no area are dropped (torchvision's detectors refuse them).
    """

    def __init__(
        self,
        images: str | os.PathLike,
        annotations: str | os.PathLike,
        transforms: Callable[[Tensor, dict], tuple[Tensor, dict]] | None = None,
        contiguous_labels: bool = True,
        skip_crowd: bool = True,
    ):
        self.images = Path(images)
        ann_path = Path(annotations)
        if not ann_path.is_file():
            raise DistillError(
                f"COCO annotation file {ann_path} not found; pass the path of annotations.json"
            )
        if not self.images.is_dir():
            raise DistillError(f"image folder {self.images} not found; pass the folder the file_names are in")
        try:
            coco = json.loads(ann_path.read_text())
        except ValueError as e:
            raise DistillError(f"{ann_path} is not valid JSON ({e}); is it a COCO annotation file?") from e
        for key in ("images", "annotations", "categories"):
            if key not in coco:
                raise DistillError(
                    f"{ann_path} has no '{key}' list; a COCO file needs images, annotations, categories"
                )
        self.transforms = transforms
        self.categories = list(coco["categories"])
        ids = [c["id"] for c in self.categories]
        self.label_of = (
            {cid: k + 1 for k, cid in enumerate(ids)} if contiguous_labels else {c: c for c in ids}
        )
        self.class_names = [c.get("name", str(c["id"])) for c in self.categories]
        self.num_classes = (len(ids) if contiguous_labels else max(ids, default=0)) + 1  # + background
        self.records = sorted(coco["images"], key=lambda r: r["id"])
        self._anns: dict[int, list[dict]] = {r["id"]: [] for r in self.records}
        for a in coco["annotations"]:
            if a["image_id"] not in self._anns:
                raise DistillError(
                    f"{ann_path}: annotation {a.get('id')} refers to unknown image {a['image_id']}"
                )
            if skip_crowd and a.get("iscrowd", 0):
                continue
            if a["category_id"] not in self.label_of:
                raise DistillError(
                    f"{ann_path}: annotation {a.get('id')} has unknown category {a['category_id']}"
                )
            self._anns[a["image_id"]].append(a)

    def __len__(self) -> int:
        return len(self.records)

    def target(self, i: int) -> dict[str, Any]:
        """The target of item `i` without reading the image."""
        rec = self.records[i]
        anns = self._anns[rec["id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        area = torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32)
        crowd = torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64)
        return {
            "boxes": boxes[keep],
            "labels": labels[keep],
            "image_id": int(rec["id"]),
            "area": area[keep],
            "iscrowd": crowd[keep],
        }

    def image(self, i: int) -> Tensor:
        """Image `i` (3, H, W) float32 in [0, 1], before `transforms`."""
        from PIL import Image

        path = self.images / self.records[i]["file_name"]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except OSError as e:
            raise DistillError(f"cannot read image {path} ({e})") from e
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)  # (3, H, W)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]]:
        image = self.image(i)
        target = self.target(i)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def coco_folder(root: str | os.PathLike, **kwargs: Any) -> CocoDetection:
    """`CocoDetection` for the layout `root/images/*` + `root/annotations.json`."""
    root = Path(root)
    return CocoDetection(root / "images", root / "annotations.json", **kwargs)


def detection_collate(samples: Sequence[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Keeps images and targets as lists: detection images may differ in size, and each image
    has its own number of boxes. `distill.outputs.as_batch` reads the pair as (inputs, targets)."""
    images, targets = zip(*samples, strict=True) if samples else ((), ())
    return list(images), list(targets)


def horizontal_flip(p: float = 0.5, generator: torch.Generator | None = None):
    """A `(image, target)` transform that mirrors the image and its boxes with probability `p`."""

    def apply(image: Tensor, target: dict) -> tuple[Tensor, dict]:
        if torch.rand((), generator=generator).item() < p:
            w = image.shape[-1]
            image = image.flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
            target = {**target, "boxes": boxes}
        return image, target

    return apply
