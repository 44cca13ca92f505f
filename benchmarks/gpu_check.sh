#!/usr/bin/env bash
# The throughput benchmark sized for about 5 minutes on one GPU (H100/H200 class), plus the
# GPU-marked tests of the fast paths. Run from the repository root:
#     bash benchmarks/gpu_check.sh [OUT_DIR]
# Writes OUT_DIR/{eager,compiled}.json and .log (OUT_DIR defaults to $OUT or ./gpu_check).
set -u
OUT_DIR="${1:-${OUT:-gpu_check}}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT_DIR/gpu.txt"

# 1. eager, bf16 autocast + channels_last, batch 256, both pairs; median of 3 interleaved rounds
#    of 50 steps per row (~1.5 min)
timeout 200 python benchmarks/throughput.py --device cuda --batch-size 256 --steps 50 --rounds 3 --warmup 20 \
    --json "$OUT_DIR/eager.json" 2>&1 | tee "$OUT_DIR/eager.log"

# 2. torch.compile on every row, the launch-bound CIFAR pair only (compilation dominates: ~2-3 min)
timeout 240 python benchmarks/throughput.py --device cuda --batch-size 256 --steps 100 --rounds 3 --warmup 30 \
    --compile --pairs resnet32x4-resnet8x4 --json "$OUT_DIR/compiled.json" 2>&1 | tee "$OUT_DIR/compiled.log"

# 3. GPU-marked tests of the trainer fast paths and FSDP2 (seconds)
timeout 90 python -m pytest -q -m gpu tests/test_speed.py tests/test_distributed.py 2>&1 | tail -5 | tee "$OUT_DIR/tests.log"
