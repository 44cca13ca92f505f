"""Compression: structured pruning (Torch-Pruning), recovery by distillation, INT8 (ONNX Runtime),
export. Importing this package imports no optional extra; the stages import theirs when run."""

from distill.compress.config import CompressConfig, CompressRecipe, load_compress_recipe

__all__ = ["CompressConfig", "CompressRecipe", "load_compress_recipe"]
