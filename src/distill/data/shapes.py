"""A synthetic object-detection set: coloured shapes on textured backgrounds, in COCO format.

Nothing is downloaded: the images are drawn here from a seed, so the same arguments always give
the same files (pixel for pixel), and a run on any machine sees the same data. The set is hard
enough to need a real detector (textured, noisy backgrounds; shapes of several sizes, colours
and aspect; occasional overlap) and small enough to train on a CPU in minutes.

Layout written (the usual COCO one, read back by `distill.data.coco.CocoDetection`)::

    <root>/images/000000.png ...
    <root>/annotations.json      # images, annotations (bbox = [x, y, w, h]), categories
    <root>/manifest.json         # the generator's arguments, to reuse the folder only when they match
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from distill.data.bundle import finish_generated_folder, start_generated_folder
from distill.errors import DistillError

SHAPE_CLASSES = ("circle", "square", "triangle", "plus")
_VERSION = 1  # bump when the drawing changes, so cached folders are regenerated


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured RGB background (H, W, 3) uint8: smooth colour field + stripes + pixel noise."""
    from PIL import Image

    # Low-frequency colour field: a coarse random grid upsampled bilinearly.
    g = int(rng.integers(2, 6))
    coarse = rng.uniform(40, 215, size=(g, g, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float64)
    # Oriented stripes of random period and strength: texture a detector must learn to ignore.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(4, 16)
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    img = img + stripes[:, :, None] * rng.uniform(0, 25)
    img = img + rng.normal(0, rng.uniform(4, 14), size=img.shape)
    return img.clip(0, 255).astype(np.uint8)


def _colour(rng: np.random.Generator, background: np.ndarray, box: tuple[int, int, int, int]) -> tuple:
    """A saturated colour far enough from the mean background under the box to be visible."""
    x0, y0, x1, y1 = box
    under = background[y0:y1, x0:x1].reshape(-1, 3).mean(0)
    for _ in range(20):
        c = rng.integers(0, 256, size=3)
        if np.abs(c - under).sum() > 160:
            break
    return tuple(int(v) for v in c)


def _draw(draw, name: str, box: tuple[int, int, int, int], colour: tuple) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if name == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif name == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif name == "triangle":
        draw.polygon([(x0 + w / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=colour)
    elif name == "plus":
        tw, th = max(2, w // 3), max(2, h // 3)
        draw.rectangle([x0, y0 + (h - th) // 2, x1 - 1, y0 + (h - th) // 2 + th - 1], fill=colour)
        draw.rectangle([x0 + (w - tw) // 2, y0, x0 + (w - tw) // 2 + tw - 1, y1 - 1], fill=colour)
    else:  # pragma: no cover - guarded by generate_shapes
        raise DistillError(f"unknown shape '{name}'")


def _iou(a: tuple, b: tuple) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def render_shapes_image(
    rng: np.random.Generator,
    image_size: int,
    classes: tuple[str, ...],
    min_objects: int,
    max_objects: int,
    min_size: int,
    max_size: int,
    max_iou: float = 0.2,
):
    """One image and its objects.

    Returns:
        (PIL.Image RGB of (image_size, image_size), list of (class_index, (x0, y0, x1, y1))) with
        boxes in pixel coordinates, x1/y1 exclusive.
    """
    from PIL import Image, ImageDraw  # Pillow comes with torchvision / matplotlib

    bg = _background(rng, image_size)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    objects: list[tuple[int, tuple[int, int, int, int]]] = []
    n = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(n):
        for _attempt in range(30):
            w = int(rng.integers(min_size, max_size + 1))
            # Mild aspect changes (circles become ellipses, squares rectangles).
            h = int(np.clip(round(w * rng.uniform(0.75, 1.33)), min_size, max_size))
            x0 = int(rng.integers(0, image_size - w + 1))
            y0 = int(rng.integers(0, image_size - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if all(_iou(box, other) <= max_iou for _, other in objects):
                cls = int(rng.integers(0, len(classes)))
                _draw(draw, classes[cls], box, _colour(rng, bg, box))
                objects.append((cls, box))
                break
    return img, objects


def generate_shapes(
    root: str | os.PathLike,
    num_images: int = 256,
    image_size: int = 64,
    classes: tuple[str, ...] | list[str] = SHAPE_CLASSES,
    min_objects: int = 1,
    max_objects: int = 4,
    min_size: int | None = None,
    max_size: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Writes the shapes set to `root` in COCO format and returns `root`.

    When `root` already holds a set made with the same arguments it is reused as is; with other
    arguments it is an error unless `overwrite=True`. The folder is written under a temporary
    name and renamed at the end, so an interrupted run never leaves a half-written set.

    Args:
        root: output folder.
        num_images: how many images.
        image_size: side of the square images, pixels.
        classes: shape names, a subset of `SHAPE_CLASSES`; category ids are 1..len(classes).
        min_objects, max_objects: objects per image, inclusive.
        min_size, max_size: object side range in pixels (default: image_size/8 .. image_size/2.5).
        seed: the whole set is a function of the arguments and this seed.
        overwrite: replace a folder made with other arguments.
    """
    classes = tuple(classes)
    unknown = [c for c in classes if c not in SHAPE_CLASSES]
    if unknown or not classes:
        raise DistillError(
            f"unknown shape classes {unknown or classes}; choose from {', '.join(SHAPE_CLASSES)}"
        )
    if image_size < 16:
        raise DistillError(f"image_size must be >= 16, got {image_size}")
    min_size = int(min_size or max(4, image_size // 8))
    max_size = int(max_size or max(min_size, int(image_size / 2.5)))
    if not 2 <= min_size <= max_size <= image_size:
        raise DistillError(
            f"need 2 <= min_size <= max_size <= image_size, got {min_size}, {max_size}, {image_size}"
        )
    if not 0 <= min_objects <= max_objects:
        raise DistillError(f"need 0 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if num_images < 1:
        raise DistillError(f"num_images must be >= 1, got {num_images}")

    root = Path(root)
    manifest = {
        "generator": "distill.data.shapes",
        "version": _VERSION,
        "num_images": num_images,
        "image_size": image_size,
        "classes": list(classes),
        "min_objects": min_objects,
        "max_objects": max_objects,
        "min_size": min_size,
        "max_size": max_size,
        "seed": seed,
    }
    tmp = start_generated_folder(root, manifest, overwrite)
    if tmp is None:
        return root
    (tmp / "images").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    try:
        for i in range(num_images):
            img, objects = render_shapes_image(
                rng, image_size, classes, min_objects, max_objects, min_size, max_size
            )
            name = f"{i:06d}.png"
            img.save(tmp / "images" / name, format="PNG")
            images.append({"id": i + 1, "file_name": name, "width": image_size, "height": image_size})
            for cls, (x0, y0, x1, y1) in objects:
                w, h = x1 - x0, y1 - y0
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": cls + 1,
                        "bbox": [x0, y0, w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
        coco = {
            "info": {"description": "distill synthetic shapes", "seed": seed},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(classes)],
        }
        (tmp / "annotations.json").write_text(json.dumps(coco))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        finish_generated_folder(tmp, root, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def shapes_splits(
    root: str | os.PathLike,
    train_images: int = 512,
    val_images: int = 128,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, Path]:
    """Generates (or reuses) `root/train` and `root/val` from different seeds; returns both paths."""
    root = Path(root)
    return {
        "train": generate_shapes(root / "train", num_images=train_images, seed=seed, **kwargs),
        "val": generate_shapes(root / "val", num_images=val_images, seed=seed + 10_000, **kwargs),
    }


def default_data_dir() -> Path:
    """Where generated sets are cached: `$DISTILL_DATA_DIR`, else `~/.cache/distill`."""
    return Path(os.environ.get("DISTILL_DATA_DIR") or Path.home() / ".cache" / "distill").expanduser()


def shapes_data(
    root: str | os.PathLike | None = None,
    train_images: int = 512,
    val_images: int = 128,
    test_images: int = 256,
    image_size: int = 64,
    classes: tuple[str, ...] | list[str] = SHAPE_CLASSES,
    min_objects: int = 1,
    max_objects: int = 4,
    flip: bool = True,
    data_seed: int = 0,
    seed: int = 0,
):
    """The shapes detection task as a recipe's `data`: a `DataBundle` of train/val/test.

    The three splits are generated once (from `data_seed`, `data_seed + 10000`, `+ 20000`) under
    `root` (default `<data dir>/shapes-<image_size>px-<hash of the settings>`) and reused; the run's `seed` does not
    change the data, so seeds compare training only. Batches are `(list of images, list of
    targets)` from `detection_collate`; `num_classes` counts the background class (K + 1).

    Args:
        flip: random horizontal flips of the training images (drawn from torch's global RNG).
    """
    from distill.data.bundle import DataBundle
    from distill.data.coco import coco_folder, detection_collate, horizontal_flip

    kw = {
        "image_size": image_size,
        "classes": tuple(classes),
        "min_objects": min_objects,
        "max_objects": max_objects,
    }
    if root is None:  # one folder per distinct setting, so recipes of other sizes never collide
        key = json.dumps([train_images, val_images, test_images, data_seed, kw], sort_keys=True, default=list)
        base = default_data_dir() / f"shapes-{image_size}px-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    else:
        base = Path(root)
    paths = {
        "train": generate_shapes(base / "train", num_images=train_images, seed=data_seed, **kw),
        "val": generate_shapes(base / "val", num_images=val_images, seed=data_seed + 10_000, **kw),
        "test": generate_shapes(base / "test", num_images=test_images, seed=data_seed + 20_000, **kw),
    }
    train = coco_folder(paths["train"], transforms=horizontal_flip() if flip else None)
    return DataBundle(
        train=train,
        val=coco_folder(paths["val"]),
        test=coco_folder(paths["test"]),
        num_classes=train.num_classes,
        input_shape=(3, image_size, image_size),
        collate_fn=detection_collate,
        meta={"root": str(base), "classes": list(classes), "task": "detection"},
    )
