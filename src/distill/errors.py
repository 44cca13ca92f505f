"""Errors that the command line prints as one line (no traceback)."""


class DistillError(Exception):
    """A problem with the user's input or setup, worded as what is wrong and how to fix it."""


class ConfigError(DistillError):
    """A recipe or override that does not validate."""


class CheckpointError(DistillError):
    """A checkpoint that is missing, corrupt, unsafe or of another model."""


class TrainingDiverged(DistillError):
    """The loss became NaN or infinite."""


# The optional extra (pyproject.toml) that installs each module a builder imports on first use.
EXTRA_OF = {
    "transformers": "nlp",
    "tokenizers": "nlp",
    "sentence_transformers": "nlp",
    "accelerate": "nlp",
    "datasets": "nlp",
    "torchvision": "vision",
    "timm": "vision",
    "torchmetrics": "vision",
    "pycocotools": "vision",
    "librosa": "speech",
    "soundfile": "speech",
    "torch_pruning": "compress",
    "onnx": "compress",
    "onnxruntime": "compress",
    "onnxscript": "compress",
    "optuna": "tune",
    "flwr": "federated",
    "tensorboard": "tensorboard",
}


def missing_extra(error: BaseException) -> DistillError | None:
    """The one-line error for a module of an optional extra that is not installed, else None."""
    name = getattr(error, "name", None) if isinstance(error, ModuleNotFoundError) else None
    top = (name or "").split(".")[0]
    if top not in EXTRA_OF:
        return None
    return DistillError(f"this needs {top}, which is not installed: pip install 'distill[{EXTRA_OF[top]}]'")
