"""INT8 with ONNX Runtime: static QDQ quantization calibrated on training data (CNNs) and dynamic
quantization (transformers); plus the ONNX Runtime session, accuracy and latency used by the report.

Static quantization fixes activation scales from a calibration pass (Jacob et al., "Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018);
QDQ format keeps QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into INT8 kernels.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from distill.checkpoint import atomic_write
from distill.compress.export import to_numpy_inputs
from distill.errors import DistillError
from distill.outputs import as_batch


def calibration_reader(batches: Iterable[Any], names: list[str], max_samples: int):
    """An ONNX Runtime `CalibrationDataReader` over a loader's batches, up to `max_samples` samples.

    Raises:
        DistillError: before any quantization work, when the data yields no sample.
    """
    from onnxruntime.quantization import CalibrationDataReader

    if max_samples <= 0:
        raise DistillError(
            "the calibration set is empty (compress.quantize.calibration_samples is 0); "
            "give it a positive number of training samples"
        )
    feeds: list[dict[str, np.ndarray]] = []
    seen = 0
    for raw in batches:
        feed = to_numpy_inputs(as_batch(raw).inputs, names)
        take = min(len(next(iter(feed.values()))), max_samples - seen)
        if take > 0:
            feeds.append({k: v[:take] for k, v in feed.items()})
            seen += take
        if seen >= max_samples:
            break
    if seen == 0:
        raise DistillError(
            "the calibration set is empty (the training data yielded no sample); "
            "check the data section of the recipe"
        )

    class _Reader(CalibrationDataReader):
        samples = seen

        def __init__(self):
            self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(feeds)

    return _Reader()


def quantize_static(src: Path, dst: Path, reader: Any, per_channel: bool, method: str) -> Path:
    """QDQ INT8 (weights and activations signed 8-bit), activation ranges from `reader`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calib = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    with tempfile.TemporaryDirectory() as d:
        pre = Path(d) / "pre.onnx"
        quant_pre_process(str(src), str(pre))

        def write(tmp):
            ort_quantize_static(
                str(pre),
                str(tmp),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=calib,
            )

        atomic_write(dst, write)
    return dst


def quantize_dynamic(src: Path, dst: Path, per_channel: bool) -> Path:
    """INT8 weights; activations quantized per batch at run time (no calibration set)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    atomic_write(
        dst,
        lambda tmp: ort_quantize_dynamic(
            str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel
        ),
    )
    return dst


# --------------------------------------------------------------------------- running ONNX models


def session(path: Path, threads: int = 1):
    """A CPU ONNX Runtime session with fixed intra-op threads and one inter-op thread."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def predict(sess, batches: Iterable[Any], names: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Argmax predictions (N,) and targets (N,) of an ONNX model over a loader."""
    preds, targets = [], []
    for raw in batches:
        b = as_batch(raw)
        logits = sess.run(["logits"], to_numpy_inputs(b.inputs, names))[0]
        preds.append(logits.reshape(-1, logits.shape[-1]).argmax(-1))
        if b.targets is not None:
            targets.append(b.targets.reshape(-1).cpu().numpy())
    return np.concatenate(preds), (np.concatenate(targets) if targets else None)


def latency(
    sess, feed: dict[str, np.ndarray], batch_size: int, repeats: int, warmup: int
) -> dict[str, float]:
    """p50 / p95 forward time in ms at `batch_size` (the first sample repeated)."""
    x = {k: np.ascontiguousarray(np.repeat(v[:1], batch_size, axis=0)) for k, v in feed.items()}
    for _ in range(warmup):
        sess.run(["logits"], x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(["logits"], x)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"p50": statistics.median(times), "p95": times[min(len(times) - 1, int(0.95 * len(times)))]}
