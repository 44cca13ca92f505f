"""Compression workflow: structured pruning (Torch-Pruning), recovery by distillation, INT8 (ONNX
Runtime), export. May import run, engine and below, never cli; optional extras are imported when run."""

from distill.compress.config import CompressConfig, CompressRecipe, load_compress_recipe

__all__ = ["CompressConfig", "CompressRecipe", "load_compress_recipe"]
