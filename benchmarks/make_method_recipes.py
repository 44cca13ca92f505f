"""Writes recipes/digits_<method>.yaml and recipes/cifar100/<pair>_<method>.yaml.

The recipes are checked in; rerun this after changing a method's settings here, so every
recipe of a family stays in step:  python benchmarks/make_method_recipes.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1] / "recipes"

# ------------------------------------------------------------------------------------ digits
# Teacher as in recipes/digits.yaml; the student is a small CNN (not the demo's MLP) so that the
# feature methods have conv maps to match. Weights follow the CIFAR literature's protocol:
# each feature/relation method is `ce + β·method` with the CRD benchmark's β; logit methods
# keep their papers' settings. Taps: SmallCNN's blocks are features.0 (8×8), features.2 (4×4),
# features.4 (2×2), and `pool` is the pooled embedding.

DIGITS_TERMS = {
    "kd": {"ce": ("ce", 0.5, {}), "kd": ("kd", 0.5, {"temperature": 4.0})},
    "lskd": {"ce": ("ce", 0.1, {}), "lskd": ("lskd", 9.0, {"temperature": 2.0})},
    "dkd": {
        "ce": ("ce", 1.0, {}),
        "dkd": ("dkd", 1.0, {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 0.083}),
    },
    "dist": {"ce": ("ce", 1.0, {}), "dist": ("dist", 1.0, {"beta": 2.0, "gamma": 2.0, "temperature": 4.0})},
    "ctkd": {"ce": ("ce", 0.5, {}), "ctkd": ("ctkd", 0.5, {"init_temperature": 4.0, "ramp": 0.1})},
    "fitnets": {
        "ce": ("ce", 1.0, {}),
        "fitnets": ("fitnets", 100.0, {"student_layer": "features.2", "teacher_layer": "features.2"}),
    },
    "at": {
        "ce": ("ce", 1.0, {}),
        "at": ("at", 1000.0, {"pairs": [["features.0", "features.0"], ["features.2", "features.2"]]}),
    },
    "sp": {
        "ce": ("ce", 1.0, {}),
        "sp": ("sp", 3000.0, {"student_layer": "features.4", "teacher_layer": "features.4"}),
    },
    "pkt": {
        "ce": ("ce", 1.0, {}),
        "pkt": ("pkt", 30000.0, {"student_layer": "pool", "teacher_layer": "pool"}),
    },
    "rkd": {"ce": ("ce", 1.0, {}), "rkd": ("rkd", 1.0, {"student_layer": "pool", "teacher_layer": "pool"})},
    "crd": {
        "ce": ("ce", 1.0, {}),
        "crd": (
            "crd",
            0.8,
            {"student_layer": "pool", "teacher_layer": "pool", "n_data": 1077, "nce_k": 1024},
        ),
    },
    # Progress-adaptive: the KD weight follows the student's measured agreement with the teacher
    # (set after each evaluation): 0.75 while it agrees with nothing, 0.25 once it agrees fully.
    "kd_adaptive": {
        "ce": ("ce", 0.5, {}),
        "kd": (
            "kd",
            {"name": "adaptive", "metric": "agreement", "start": 0.75, "end": 0.25},
            {"temperature": 4.0},
        ),
    },
    # Per-sample weights: each sample's KD counts by the teacher's probability of its true label.
    "kd_weighted": {
        "ce": ("ce", 0.5, {}),
        "kd": ("weighted", 0.5, {"term": {"name": "kd", "temperature": 4.0}, "rule": "target_prob"}),
    },
}


def _terms(spec):
    return {n: {"name": name, "weight": w, "init_args": args} for n, (name, w, args) in spec.items()}


def digits_recipe(method: str) -> dict:
    data = {"name": "digits", "init_args": {}, "batch_size": 64}
    if method == "crd":  # CRD keys its memory bank by sample index
        data = {"name": "indexed", "init_args": {"dataset": {"name": "digits"}}, "batch_size": 64}
    return {
        "name": f"digits_{method}",
        "seed": 0,
        "data": data,
        "teacher": {
            "name": "cnn",
            "init_args": {"channels": [32, 64, 128], "dropout": 0.1},
            "train": {"epochs": 30, "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0001}},
        },
        "student": {"name": "cnn", "init_args": {"channels": [8, 16, 32]}},
        "objective": {"terms": _terms(DIGITS_TERMS[method])},
        "trainer": {
            "epochs": 30,
            "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0001},
            "lr_schedule": {"name": "cosine"},
        },
        "baselines": ["scratch"],
    }


# ----------------------------------------------------------------------------------- CIFAR-100
# The literature's recipe (CRD, Tian et al. 2020; DKD, Zhao et al. 2022): SGD lr 0.05 (0.01 for
# ShuffleNet/MobileNet students), momentum 0.9, weight decay 5e-4, 240 epochs, lr ×0.1 at
# epochs 150/180/210, batch 64, random crop + flip. Teachers are trained with the same recipe.

PAIRS = {
    # name: teacher, student, student lr, taps {stage outputs...}, pooled embedding
    "resnet32x4_resnet8x4": (
        "resnet32x4",
        "resnet8x4",
        0.05,
        ["layer1", "layer2", "layer3"],
        ["layer1", "layer2", "layer3"],
    ),
    "wrn_40_2_wrn_16_2": (
        "wrn_40_2",
        "wrn_16_2",
        0.05,
        ["block1", "block2", "block3"],
        ["block1", "block2", "block3"],
    ),
    "vgg13_vgg8": ("vgg13", "vgg8", 0.05, ["block1", "block2", "block3"], ["block1", "block2", "block3"]),
    "resnet32x4_ShuffleNetV2": (
        "resnet32x4",
        "ShuffleNetV2",
        0.01,
        ["layer1", "layer2", "layer3"],
        ["layer1", "layer2", "layer3"],
    ),
}
DKD_BETA = {
    "resnet32x4_resnet8x4": 8.0,
    "wrn_40_2_wrn_16_2": 6.0,
    "vgg13_vgg8": 6.0,
    "resnet32x4_ShuffleNetV2": 8.0,
}


def cifar_terms(pair: str, method: str) -> dict:
    _, _, _, t_stages, s_stages = PAIRS[pair]
    ce1 = ("ce", 1.0, {})
    emb = {"student_layer": "avgpool", "teacher_layer": "avgpool"}
    return {
        "kd": {"ce": ("ce", 0.1, {}), "kd": ("kd", 0.9, {"temperature": 4.0})},
        "dkd": {
            "ce": ce1,
            "dkd": (
                "dkd",
                1.0,
                {"alpha": 1.0, "beta": DKD_BETA[pair], "temperature": 4.0, "warmup": 20 / 240},
            ),
        },
        "lskd": {"ce": ("ce", 0.1, {}), "lskd": ("lskd", 9.0, {"temperature": 2.0})},
        "dist": {"ce": ce1, "dist": ("dist", 1.0, {"beta": 2.0, "gamma": 2.0, "temperature": 4.0})},
        "ctkd": {"ce": ("ce", 0.1, {}), "ctkd": ("ctkd", 0.9, {"init_temperature": 4.0, "ramp": 10 / 240})},
        "fitnets": {
            "ce": ce1,
            "fitnets": ("fitnets", 100.0, {"student_layer": s_stages[1], "teacher_layer": t_stages[1]}),
        },
        "at": {"ce": ce1, "at": ("at", 1000.0, {"pairs": [list(p) for p in zip(s_stages, t_stages)]})},
        "sp": {
            "ce": ce1,
            "sp": ("sp", 3000.0, {"student_layer": s_stages[-1], "teacher_layer": t_stages[-1]}),
        },
        "pkt": {"ce": ce1, "pkt": ("pkt", 30000.0, emb)},
        "rkd": {"ce": ce1, "rkd": ("rkd", 1.0, emb)},
        "crd": {"ce": ce1, "crd": ("crd", 0.8, {**emb, "n_data": 50000, "feat_dim": 128, "nce_k": 16384})},
    }[method]


CIFAR_METHODS = ("kd", "dkd", "lskd", "dist", "ctkd", "fitnets", "at", "sp", "pkt", "rkd", "crd")


def _sgd(lr: float, epochs: int = 240) -> dict:
    return {
        "epochs": epochs,
        "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 0.0005},
        "lr_schedule": {"name": "step", "milestones": [150 / 240, 180 / 240, 210 / 240], "gamma": 0.1},
    }


def cifar_recipe(pair: str, method: str) -> dict:
    teacher, student, lr, _, _ = PAIRS[pair]
    data: dict = {"name": "cifar100", "init_args": {"root": "data"}, "batch_size": 64, "num_workers": 4}
    if method == "crd":
        data = {
            "name": "indexed",
            "init_args": {"dataset": {"name": "cifar100", "init_args": {"root": "data"}}},
            "batch_size": 64,
            "num_workers": 4,
        }
    return {
        "name": f"cifar100_{pair}_{method}",
        "seed": 0,
        "data": data,
        "teacher": {"name": teacher, "init_args": {}, "train": _sgd(0.05)},
        "student": {"name": student, "init_args": {}},
        "objective": {"terms": _terms(cifar_terms(pair, method))},
        "trainer": _sgd(lr),
        "baselines": ["scratch"],
    }


HEADER = """\
# Generated by benchmarks/make_method_recipes.py; edit there and rerun.
# {what}
# Run: distill run {path}
"""


def write(path: Path, recipe: dict, what: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rel = path.relative_to(ROOT.parent)
    body = yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=110)
    path.write_text(HEADER.format(what=what, path=rel) + body)


def main() -> None:
    for m in DIGITS_TERMS:
        write(
            ROOT / f"digits_{m}.yaml",
            digits_recipe(m),
            f"Method '{m}' on digits: CNN teacher -> small CNN student.",
        )
    for pair in PAIRS:
        for m in CIFAR_METHODS:
            what = (
                f"CIFAR-100 {pair.replace('_', ' ', 0)}, method '{m}', the literature's recipe. Needs CIFAR-100 in "
                "data/cifar-100-python; set teacher.checkpoint to reuse a trained teacher."
            )
            write(ROOT / "cifar100" / f"{pair}_{m}.yaml", cifar_recipe(pair, m), what)


if __name__ == "__main__":
    main()
