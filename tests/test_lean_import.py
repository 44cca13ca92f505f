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
    "timm",
    "datasets",
    "pyarrow",
    "pandas",
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


def test_help_imports_no_torch():
    """`distill --help` builds every command's parser and answers without importing torch (the
    import alone takes seconds on a cold machine); each command imports torch when it runs."""
    code = (
        "import sys, runpy\n"
        "sys.argv = ['distill', '--help']\n"
        "try:\n"
        "    runpy.run_module('distill', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'numpy', 'matplotlib', 'yaml', 'pydantic') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: distill" in out
    assert out.strip().splitlines()[-1] == "HEAVY=", out.strip().splitlines()[-1]
