import subprocess
import sys

EXTRAS = [
    "torchvision",
    "transformers",
    "sentence_transformers",
    "optuna",
    "flwr",
    "torch_pruning",
    "onnx",
    "onnxruntime",
    "librosa",
    "torchmetrics",
    "tensorboard",
    "matplotlib",
]


def test_import_distill_pulls_no_optional_extra():
    code = (
        "import sys, distill, distill.cli, distill.engine.trainer, distill.run.pipeline\n"
        f"bad = [m for m in {EXTRAS!r} if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"import distill imported optional extras: {out}"
