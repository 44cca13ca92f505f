"""The pseudo-label store: a detection teacher's boxes on transfer images, kept, stored once, reused."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchvision")


def _dets(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "scores": torch.tensor(scores),
        "labels": torch.tensor(labels),
    }


def test_keep_boxes_thresholds_scores_and_removes_duplicates_across_classes():
    from distill.teachers.pseudo_labels import keep_boxes

    d = _dets(
        [[0, 0, 10, 10], [1, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [5, 5, 5, 9]],
        [0.9, 0.8, 0.6, 0.2, 0.95],
        [1, 2, 3, 1, 2],
    )
    got = keep_boxes(d, score_threshold=0.5, iou=0.5)
    # box 1 (another class over box 0) goes to NMS; box 3 scores too low; box 4 has no width
    assert got["labels"].tolist() == [1, 3]
    assert got["boxes"].tolist() == [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert got["scores"].tolist() == pytest.approx([0.9, 0.6])
    assert keep_boxes(d, score_threshold=0.99, iou=0.5)["boxes"].shape == (0, 4)


class _Images(torch.utils.data.Dataset):
    """Four 32x32 images with ground truth that pseudo-labels must never read."""

    def __init__(self, transforms=None):
        g = torch.Generator().manual_seed(0)
        self.images = [torch.rand(3, 32, 32, generator=g) for _ in range(4)]
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> torch.Tensor:
        return self.images[i]

    def __getitem__(self, i):
        raise AssertionError("pseudo-labelling read a ground-truth target")


class _CountingAdapter:
    def __init__(self):
        from distill.models.detection import DetectionAdapter

        self.inner, self.calls = DetectionAdapter(), 0

    def __call__(self, model, batch):
        self.calls += 1
        return self.inner(model, batch)


@pytest.fixture(scope="module")
def teacher():
    from distill.models.detection import build_detector

    torch.manual_seed(0)
    return build_detector(
        "fcos", "mobilenet_v3_small", num_classes=3, image_size=32, fpn_channels=32, head_convs=1
    ).eval()


def test_store_is_written_once_and_reused_while_teacher_images_and_settings_match(tmp_path, teacher):
    from distill.teachers.pseudo_labels import load_pseudo_labels, pseudo_label

    path, data, adapter = tmp_path / "pl.safetensors", _Images(), _CountingAdapter()
    first = pseudo_label(teacher, data, adapter, score_threshold=0.0, iou=0.5, batch_size=3, store=path)
    assert path.is_file() and adapter.calls == 2  # 4 images in batches of 3
    assert len(first) == 4 and sum(len(x["labels"]) for x in first) > 0  # threshold 0 keeps some boxes
    again = pseudo_label(teacher, data, adapter, score_threshold=0.0, iou=0.5, batch_size=3, store=path)
    assert adapter.calls == 2  # read from the file: the teacher did not run
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "labels", "scores"))
    assert all(x["scores"].min() >= 0 for x in first if len(x["scores"]))
    # another threshold, or other teacher weights: labelled again and written over the file
    pseudo_label(teacher, data, adapter, score_threshold=0.3, iou=0.5, store=path)
    assert adapter.calls == 3
    other = pytest.importorskip("copy").deepcopy(teacher)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    pseudo_label(other, data, adapter, score_threshold=0.3, iou=0.5, store=path)
    assert adapter.calls == 4
    assert load_pseudo_labels(tmp_path / "none.safetensors") is None


def test_pseudo_labelled_flips_the_stored_boxes_with_the_image():
    from distill.data.coco import horizontal_flip
    from distill.teachers.pseudo_labels import PseudoLabelled

    labels = [
        {
            "boxes": torch.tensor([[2.0, 4.0, 10.0, 12.0]]),
            "labels": torch.tensor([1]),
            "scores": torch.tensor([0.9]),
        }
    ] * 4
    flipped = PseudoLabelled(_Images(transforms=horizontal_flip(p=1.0)), labels)
    image, target = flipped[1]
    assert torch.equal(image, _Images().images[1].flip(-1))
    assert target["boxes"].tolist() == [[22.0, 4.0, 30.0, 12.0]] and target["labels"].tolist() == [1]
    assert labels[1]["boxes"].tolist() == [[2.0, 4.0, 10.0, 12.0]]  # the stored boxes untouched
    plain = PseudoLabelled(_Images(), labels)
    assert plain[0][1]["boxes"].tolist() == [[2.0, 4.0, 10.0, 12.0]]
    with pytest.raises(Exception, match="pseudo-labelled images"):
        PseudoLabelled(_Images(), labels[:2])


def test_detection_transfer_without_a_teacher_is_refused(tmp_path):
    from distill.data.bundle import DataBundle
    from distill.errors import ConfigError
    from distill.run.config import RecipeConfig
    from distill.run.pipeline import add_transfer, build_objective

    cfg = RecipeConfig.model_validate({"data": {"name": "digits", "transfer": {"name": "digits"}}})
    sample = (torch.zeros(3, 8, 8), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0).long()})
    data = DataBundle(train=[sample])
    with pytest.raises(ConfigError, match="teacher's boxes"):
        add_transfer(cfg, data, build_objective(cfg))


@pytest.mark.slow
def test_detection_transfer_recipe_trains_on_stored_pseudo_labels(tmp_path):
    """recipes/detect_shapes_transfer.yaml on tiny settings: the transfer images are labelled once by
    the teacher, stored in the run folder, and the distilled student trains on both sets."""
    import json

    pytest.importorskip("pycocotools")
    from distill.run.config import load_recipe
    from distill.run.pipeline import run_recipe
    from distill.teachers.pseudo_labels import load_pseudo_labels

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_recipe(
        root / "recipes" / "detect_shapes_transfer.yaml",
        [
            f"data.init_args.root={tmp_path / 'shapes'}",
            "data.init_args.train_images=8",
            "data.init_args.val_images=4",
            "data.init_args.test_images=4",
            "data.init_args.image_size=32",
            f"data.transfer.init_args.root={tmp_path / 'transfer'}",
            "data.transfer.init_args.train_images=8",
            "data.transfer.init_args.image_size=32",
            "data.pseudo_labels.score_threshold=0.0",
            "teacher.init_args.image_size=32",
            "student.init_args.image_size=32",
            "teacher.train.epochs=1",
            "teacher.train.progress=off",
            "trainer.max_steps=2",
            "trainer.progress=off",
            "report.latency_repeats=1",
        ],
    )
    run_recipe(cfg, tmp_path / "run")
    labels = load_pseudo_labels(tmp_path / "run" / "pseudo_labels.safetensors")
    assert labels is not None and len(labels) == 8
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd = [r for r in lines if r["stage"] == "student_kd" and r["split"] == "val"]
    assert kd and "map" in kd[-1]
