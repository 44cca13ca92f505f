"""Detection: shapes generator, COCO loader, adapter, loss terms, mAP, and a KD step."""

import json

import pytest
import torch

pytest.importorskip("torchvision")

from distill.data.coco import CocoDetection, coco_folder, detection_collate  # noqa: E402
from distill.data.shapes import generate_shapes  # noqa: E402
from distill.errors import DistillError  # noqa: E402
from distill.losses.detection import (  # noqa: E402
    DenseHeadKD,
    DetectorLoss,
    FPNImitation,
    box_mask,
    feature_imitation_loss,
    sigmoid_kd_loss,
)
from distill.models.detection import (  # noqa: E402
    DetectionEvaluator,
    build_detector,
    detection_adapter,
    teacher_detection_adapter,
)
from distill.objective import Objective  # noqa: E402
from distill.outputs import Batch, Outputs, as_batch  # noqa: E402
from distill.registry import LOSSES  # noqa: E402
from distill.teachers import Teacher  # noqa: E402


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "set", num_images=8, image_size=64, seed=3)


def test_shapes_deterministic_given_seed(tmp_path, shapes):
    again = generate_shapes(tmp_path / "again", num_images=8, image_size=64, seed=3)
    other = generate_shapes(tmp_path / "other", num_images=8, image_size=64, seed=4)
    assert _files(again) == _files(shapes)
    assert _files(other)["annotations.json"] != _files(shapes)["annotations.json"]


def test_shapes_reuse_and_mismatch(shapes):
    before = _files(shapes)
    assert generate_shapes(shapes, num_images=8, image_size=64, seed=3) == shapes
    assert _files(shapes) == before
    with pytest.raises(DistillError, match="overwrite"):
        generate_shapes(shapes, num_images=9, image_size=64, seed=3)
    with pytest.raises(DistillError, match="unknown shape"):
        generate_shapes(shapes.parent / "x", classes=("hexagon",))


def test_coco_round_trip(shapes):
    coco = json.loads((shapes / "annotations.json").read_text())
    ds = coco_folder(shapes)
    assert len(ds) == len(coco["images"]) == 8
    assert ds.num_classes == 5 and ds.class_names == ["circle", "square", "triangle", "plus"]
    n_boxes = 0
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        anns = [a for a in coco["annotations"] if a["image_id"] == target["image_id"]]
        want = torch.tensor(
            [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32
        )
        assert torch.equal(target["boxes"], want.reshape(-1, 4))
        assert target["labels"].tolist() == [a["category_id"] for a in anns]
        n_boxes += len(anns)
    assert n_boxes == len(coco["annotations"]) > 0
    images, targets = detection_collate([ds[0], ds[1]])
    assert len(images) == len(targets) == 2
    b = as_batch((images, targets))
    assert b.size == 2 and b.targets is targets


def test_coco_loader_maps_ids_and_skips_crowd(tmp_path, shapes):
    coco = {
        "images": [{"id": 5, "file_name": "000000.png", "width": 64, "height": 64}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 7, "bbox": [1, 2, 10, 20], "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [5, 5, 3, 3], "iscrowd": 0},
            {"id": 3, "image_id": 5, "category_id": 3, "bbox": [0, 0, 30, 30], "iscrowd": 1},
            {
                "id": 4,
                "image_id": 5,
                "category_id": 3,
                "bbox": [9, 9, 0, 4],
                "iscrowd": 0,
            },  # no area: dropped
        ],
        "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    _, target = CocoDetection(shapes / "images", ann)[0]
    assert target["labels"].tolist() == [2, 1]
    assert target["boxes"].tolist() == [[1, 2, 11, 22], [5, 5, 8, 8]]
    _, raw = CocoDetection(shapes / "images", ann, contiguous_labels=False)[0]
    assert raw["labels"].tolist() == [7, 3]
    with pytest.raises(DistillError, match="not found"):
        CocoDetection(shapes / "images", tmp_path / "missing.json")


def test_box_mask_marks_cells_near_objects():
    boxes = [
        torch.tensor([[16.0, 16.0, 32.0, 32.0]]),
        torch.zeros(0, 4),
        torch.tensor([[0.0, 0.0, 2.0, 2.0]]),
    ]
    m = box_mask(boxes, (64, 64), (8, 8), expand=0.0)
    assert m.shape == (3, 8, 8)
    assert m[0].sum() == 4 and m[0, 2:4, 2:4].all()  # cell centres 20, 28 inside [16, 32]
    assert m[1].sum() == 0
    assert m[2].sum() == 1 and m[2, 0, 0] == 1  # smaller than a cell: its centre cell
    assert box_mask(boxes[:1], (64, 64), (8, 8), expand=0.5)[0].sum() > 4


def test_feature_imitation_loss_plain_formula():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.allclose(feature_imitation_loss(s, t), ((s - t) ** 2).mean(dim=(1, 2, 3)))
    mask = torch.zeros(2, 4, 4)
    mask[0, 1, 1] = 1
    got = feature_imitation_loss(s, t, mask)
    assert torch.allclose(got[0], ((s[0, :, 1, 1] - t[0, :, 1, 1]) ** 2).mean()) and got[1] == 0
    assert feature_imitation_loss(t, t, mask).abs().max() == 0


def test_sigmoid_kd_matches_bernoulli_kl():
    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    T = 2.0
    p, q = torch.sigmoid(t / T), torch.sigmoid(s / T)
    want = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()) * T**2
    assert torch.allclose(sigmoid_kd_loss(s, t, T), want, atol=1e-5)
    assert sigmoid_kd_loss(t, t, T).abs().max() < 1e-6
    assert (sigmoid_kd_loss(s, t, T) >= -1e-7).all()


def test_terms_registered_and_validated():
    for name in ("detector_loss", "fpn_imitation", "det_head_kd"):
        assert name in LOSSES
    with pytest.raises(DistillError, match="mask"):
        FPNImitation(mask="boxes")
    with pytest.raises(DistillError, match="temperature"):
        DenseHeadKD(temperature=0)
    with pytest.raises(DistillError, match="no detector losses"):
        DetectorLoss()(Outputs(), None, Batch(inputs=torch.zeros(1)))
    bad = Outputs(extras={"cls_logits": torch.zeros(1, 10, 4)})
    with pytest.raises(DistillError, match="same head family"):
        DenseHeadKD()(
            Outputs(extras={"cls_logits": torch.zeros(1, 12, 4)}), bad, Batch(inputs=torch.zeros(1))
        )


def test_evaluator_perfect_and_wrong_detections():
    gt = [
        {
            "boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0], [30.0, 30.0, 50.0, 60.0]]),
            "labels": torch.tensor([1, 2]),
        }
    ]
    batch = Batch(inputs=[torch.zeros(3, 64, 64)], targets=gt)
    perfect = [{**gt[0], "scores": torch.tensor([0.9, 0.8])}]
    ev = DetectionEvaluator()
    ev.update(Outputs(extras={"detections": perfect}), None, batch)
    res = ev.compute()
    assert res["map"] == pytest.approx(1.0) and res["map_50"] == pytest.approx(1.0)
    ev.reset()
    wrong = [{"boxes": gt[0]["boxes"], "labels": torch.tensor([2, 1]), "scores": torch.tensor([0.9, 0.8])}]
    ev.update(Outputs(extras={"detections": wrong}), None, batch)
    assert ev.compute()["map"] == pytest.approx(0.0)
    with pytest.raises(DistillError, match="eval mode"):
        ev.update(Outputs(), None, batch)


def _tiny(arch, backbone, **kw):
    return build_detector(arch, backbone, num_classes=5, image_size=64, fpn_channels=32, **kw)


@pytest.mark.parametrize("arch", ["retinanet", "fasterrcnn"])
def test_adapter_reads_other_detectors(arch, shapes):
    torch.manual_seed(0)
    model = _tiny(arch, "resnet18", anchor_scale=0.5)
    batch = as_batch(detection_collate([coco_folder(shapes)[i] for i in range(2)]))
    out = detection_adapter(model.train(), batch)
    assert set(out.features) >= {"backbone.0", "backbone.1", "backbone.2"}
    assert all(torch.isfinite(v) for v in out.extras["losses"].values())
    assert DetectorLoss()(out, None, batch).requires_grad
    with torch.inference_mode():
        dets = detection_adapter(model.eval(), batch).extras["detections"]
    assert len(dets) == 2 and dets[0]["boxes"].shape[-1] == 4


def test_detection_kd_step_decreases_loss(shapes):
    """Teacher FCOS/ResNet-18 -> student FCOS/MobileNetV3-small: detector loss + masked FPN
    imitation + head KD; the summed loss falls over a few steps on one batch."""
    torch.manual_seed(0)
    teacher_model = _tiny("fcos", "resnet18", head_convs=1)
    student = _tiny("fcos", "mobilenet_v3_small", head_convs=1).train()
    teacher = Teacher(teacher_model, adapter=teacher_detection_adapter)
    ds = coco_folder(shapes)
    batch = as_batch(detection_collate([ds[i] for i in range(2)]))
    objective = Objective(
        {"det": DetectorLoss(), "fpn": FPNImitation(mask="gt"), "head_kd": DenseHeadKD(temperature=2.0)},
        weights={"fpn": 1.0, "head_kd": 1.0},
    )
    t_out = teacher(batch)
    assert not any(p.requires_grad for p in teacher_model.parameters())
    objective.setup(detection_adapter(student, batch), t_out, batch)
    assert len(objective.terms["fpn"].adapters) == 5  # levels 0, 1, 2, p6, p7
    opt = torch.optim.Adam(list(student.parameters()) + list(objective.parameters()), lr=1e-3)
    losses = []
    for _ in range(4):
        out = objective(detection_adapter(student, batch), teacher(batch), batch)
        assert all(torch.isfinite(v) for v in out.values())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0]
    assert objective.terms["fpn"].adapters["0"].weight.grad is not None
    with torch.inference_mode():  # one image alone: the 1x1 top level must not break GroupNorm
        dets = detection_adapter(student.eval(), Batch(inputs=[ds[0][0]])).extras["detections"]
    assert len(dets) == 1


def test_fpn_imitation_level_errors(shapes):
    s = Outputs(features={"backbone.0": torch.zeros(1, 8, 4, 4)})
    t = Outputs(features={"backbone.0": torch.zeros(1, 16, 4, 4)})
    b = Batch(inputs=torch.zeros(1))
    with pytest.raises(DistillError, match="not found"):
        FPNImitation(levels=["p6"]).setup(s, t, b)
    term = FPNImitation(levels={"0": "0"}, mask="none")
    term.setup(s, t, b)
    assert term.adapters["0"].out_channels == 16
    torch.nn.init.zeros_(term.adapters["0"].bias)
    assert term(s, t, b).item() == pytest.approx(0.0)
    with pytest.raises(DistillError, match="no FPN levels"):
        FPNImitation().setup(Outputs(), t, b)


def test_detect_recipe_parses_and_builds(tmp_path):
    from pathlib import Path

    from distill.data.bundle import build_data
    from distill.models.build import build_model
    from distill.run.config import load_recipe
    from distill.run.pipeline import build_objective

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "detect_shapes.yaml"
    size = ["data.init_args.train_images=4", "data.init_args.val_images=2", "data.init_args.test_images=2"]
    cfg = load_recipe(recipe, [f"data.init_args.root={tmp_path}", *size])
    data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)
    assert data.num_classes == 5 and len(data.train) == 4 and data.collate_fn is detection_collate
    teacher, student = build_model(cfg.teacher.spec(), data), build_model(cfg.student.spec(), data)
    assert sum(p.numel() for p in student.parameters()) * 5 < sum(p.numel() for p in teacher.parameters())
    objective = build_objective(cfg)
    assert set(objective.terms) == {"det", "fpn", "head_kd"}
    assert cfg.trainer.monitor == "map"


def test_distilling_teacher_runs_no_nms_but_its_measurement_does(shapes, monkeypatch, tmp_path):
    """The recipe's teacher adapter is the full DetectionAdapter (its mAP row needs detections); as
    the distilling teacher it ran NMS on every step for boxes no term reads. Now it stops after
    the head there (`teaching_adapter`), and the measured teacher keeps its detections."""
    import torchvision.ops.boxes as box_ops

    from distill.models.detection import DetectionAdapter
    from distill.run import pipeline
    from distill.run.config import RecipeConfig

    calls = []
    real = box_ops.batched_nms
    monkeypatch.setattr(box_ops, "batched_nms", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = _tiny("fcos", "resnet18", head_convs=1)
    monkeypatch.setattr(pipeline, "load_teacher", lambda *a, **k: (model, DetectionAdapter(), {}))
    teacher, _, rows = pipeline.build_teachers(RecipeConfig(), None, tmp_path)
    batch = as_batch(detection_collate([coco_folder(shapes)[i] for i in range(2)]))
    out = teacher(batch)
    assert not calls and "detections" not in out.extras and "cls_logits" in out.extras
    (_, measured, adapter, _) = rows[0]
    with torch.inference_mode():
        assert "detections" in adapter(measured.eval(), batch).extras
    assert calls  # the measurement post-processes
