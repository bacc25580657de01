"""fp32 ONNX embedding model -> int8: onnxruntime static quantisation (QDQ, per-channel weights).

What is quantised, and why (figures: EfficientNet-Lite0, bench/results/int8.md):
- The convolutional trunk, all its ops (Conv, Clip = ReLU6, Add): quantising Conv alone is
  worse (mean cosine to fp32 0.88), because each Conv output is then quantised over its whole
  pre-activation range instead of ReLU6's [0, 6].
- Not the first FLOAT_STEM_CONVS convolutions: rounding the 27-weight stem filters and the
  first depthwise filters to int8 caused 80% of the drift of the whole model, for under 4% of
  its multiply-adds (and keeping them float made the int8 model faster: 1.87x fp32, not 1.49x).
  Every node before the next Conv stays float with them.
- Not the tail after the last Conv (pooling, a fine-tuned Dense head, the L2 norm): a sliver
  of the compute, and quantising it puts rounding error straight into the vector and its norm
  (norms off by up to 1.7%).
- Biases are corrected for the mean shift int8 weights cause (export/bias_correction.py).
- Weights use 7 of their 8 bits (onnxruntime's `reduce_range`). On x86 CPUs without VNNI (AVX2,
  and AVX-512 without VNNI) onnxruntime's u8 x s8 kernels add pairs of products in int16, which
  full-range weights overflow: the same model that kept a mean cosine of 0.998 to fp32 on an
  AVX-512 VNNI Xeon fell to 0.978 on an AVX2 EPYC (refused by the drift check), and 0.9965 there
  with 7-bit weights. The file runs on whatever CPU serves it, so it is made safe for all of them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

# Calibration methods by their command-line names. On EfficientNet-Lite0 entropy gave exactly
# MinMax's model and percentile the same drift (mean cosine 0.9983 vs 0.9981), each in 3-4x
# the time: MinMax is the default. (ReLU6 already bounds most activations to [0, 6].)
CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")
DEFAULT_CALIBRATION = "minmax"
CALIBRATION_BATCH = 8  # images per calibration run: bounds the memory the histograms see
FLOAT_STEM_CONVS = 2
WEIGHT_BITS = 7  # reduce_range: no int16 overflow on CPUs without VNNI (see above)


class QuantizationError(RuntimeError):
    """The model cannot be quantised as asked (no convolution in it, no calibration images)."""


class ImageCalibrationReader(CalibrationDataReader):
    """Feeds prepared uint8 images (N, H, W, 3) to the calibrator, a batch at a time."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int = CALIBRATION_BATCH) -> None:
        self.input_name, self.images, self.batch = input_name, images, batch
        self.batches: Iterator[np.ndarray] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = next(self.batches, None)
        return None if chunk is None else {self.input_name: chunk}

    def rewind(self) -> None:
        self.batches = (
            np.ascontiguousarray(self.images[i : i + self.batch]) for i in range(0, len(self.images), self.batch)
        )


def float_nodes(model_proto, stem_convs: int = FLOAT_STEM_CONVS) -> list[str]:
    """Names of the nodes left in float: everything before the (stem_convs + 1)-th Conv, and
    everything after the last Conv (pooling, head, L2 norm). Nodes are in topological order."""
    nodes = list(model_proto.graph.node)
    convs = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    if len(convs) <= stem_convs:
        raise QuantizationError(
            f"int8: the model has {len(convs)} convolutions; the first "
            f"{stem_convs} stay float, which leaves nothing to quantise"
        )
    return [node.name for node in nodes[: convs[stem_convs]] + nodes[convs[-1] + 1 :]]


def quantize_int8(
    onnx_bytes: bytes,
    calibration_images: np.ndarray,
    *,
    input_name: str,
    method: str = DEFAULT_CALIBRATION,
    bias_correction: bool = True,
) -> bytes:
    """The int8 (QDQ) version of an fp32 model, calibrated on prepared uint8 images."""
    import onnx

    from export.bias_correction import conv_input_means, correct_biases, dequantized_conv_weights

    if len(calibration_images) == 0:
        raise QuantizationError("int8: no calibration images")
    if method not in CALIBRATION_METHODS:
        raise QuantizationError(
            f"int8: unknown calibration method {method!r} (one of {', '.join(CALIBRATION_METHODS)})"
        )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="export-int8-") as tmp:
        fp32_path, pre_path, int8_path = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        fp32_path.write_bytes(onnx_bytes)
        # Pre-processing folds tf2onnx's loose BatchNorm Mul/Add into the convolutions; without
        # it a whole-trunk int8 model drifted 7x further (mean cosine 0.932, not 0.990). Symbolic
        # shape inference needs sympy and the shapes here are static: ONNX's own is enough.
        quant_pre_process(str(fp32_path), str(pre_path), skip_symbolic_shape=True)
        prepared = onnx.load(str(pre_path))
        for i, node in enumerate(prepared.graph.node):
            node.name = node.name or f"{node.op_type}_{i}"  # nodes_to_exclude goes by name
        excluded = float_nodes(prepared)
        onnx.save(prepared, str(pre_path))
        if bias_correction:
            # int8 weights do not depend on calibration: one batch is enough to read them back
            run_static(pre_path, int8_path, calibration_images[:1], input_name, "minmax", excluded)
            quantized = dequantized_conv_weights(onnx.load(str(int8_path)))
            means = conv_input_means(prepared, set(quantized), calibration_images, input_name)
            correct_biases(prepared, quantized, means)
            onnx.save(prepared, str(pre_path))
        run_static(pre_path, int8_path, calibration_images, input_name, method, excluded)
        return int8_path.read_bytes()


def run_static(
    model_path: Path, out_path: Path, images: np.ndarray, input_name: str, method: str, excluded: list[str]
) -> None:
    """onnxruntime's quantize_static with this project's settings, model file to model file
    (given a ModelProto, quantize_static may rewrite its tensors in place)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    quantize_static(
        str(model_path),
        str(out_path),
        ImageCalibrationReader(input_name, images),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        # u8 activations x s8 weights: the VNNI fast path on x86 (no saturation there)
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=calibrate,
        nodes_to_exclude=excluded,
        reduce_range=WEIGHT_BITS == 7,
    )
