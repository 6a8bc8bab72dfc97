"""What gets quantized, how, and for which target: one `Recipe` per calibration.

Quantized: every linear layer (MatMul by a `.weight` initializer): weights
per-channel (INT8) or per-tensor (FP8) symmetric, activations per-tensor symmetric,
zero points 0 - the Q/DQ pattern TensorRT fuses into its INT8/FP8 GEMMs.
Left in the export precision: norms, softmax, RoPE, the NAAViT attention op, the
embedding, and by choice (`keep`) the LM head and the vision tower.
"""

from __future__ import annotations

from dataclasses import dataclass

from saisa_edge.calibration.stats import METHODS
from saisa_edge.errors import SaisaError
from saisa_edge.targets import WEIGHT_ONLY, Target, check_precision, target

PRECISIONS = ("int8", "fp8", "int8_sq", "int8_wo", "int4_awq", "int4_rtn")
SPELLINGS = {"int8_sq": "int8"}  # int8 (W8A8, SmoothQuant) keeps its manifest name; int8_sq is TensorRT-LLM's
WEIGHT_BITS = dict(zip(WEIGHT_ONLY, (8, 4, 4)))  # W8A16 / W4A16 (float activations): bits of the weights
DEFAULT_GROUP_SIZE = 128
# MatMulNBits' accuracy_level: 0 computes in float (W4A16 exactly); 4 quantizes each block of
# activations to int8 on the fly, which ONNX Runtime's x86 kernels need to be fast (measured:
# 4-bit decode GEMV ~15x faster, 8-bit ~35x, than level 0 on AVX2 without VNNI)
NBITS_ACCURACY = (0, 4)
DEFAULT_NBITS_ACCURACY = 4
KEEPABLE = ("lm_head", "vision")
DEFAULT_KEEP = ("lm_head",)
DEFAULT_METHOD = {"int8": "percentile", "fp8": "max"}
DEFAULT_SMOOTHQUANT = 0.5
DEFAULT_MAX_NOISE = 0.1
DEFAULT_PERCENTILE = 99.99
FP8_MAX = 448.0  # largest finite float8 e4m3fn


@dataclass(frozen=True)
class Recipe:
    precision: str
    target: Target
    method: str
    keep: tuple[str, ...]
    smoothquant: float | None  # SmoothQuant's alpha; None: no smoothing (always for FP8)
    percentile: float = DEFAULT_PERCENTILE
    max_noise: float = DEFAULT_MAX_NOISE  # a linear whose input would lose more (noise/signal) stays in float
    group_size: int = DEFAULT_GROUP_SIZE  # int4: rows of K sharing a scale
    nbits_accuracy: int = DEFAULT_NBITS_ACCURACY  # MatMulNBits' accuracy_level (the cpu form)

    @property
    def weight_only(self) -> bool:
        return self.precision in WEIGHT_BITS

    @property
    def weight_bits(self) -> int:
        return WEIGHT_BITS[self.precision]

    @property
    def awq(self) -> bool:
        return self.precision == "int4_awq"

    @property
    def form(self) -> str:
        """Weight-only graph form: MatMulNBits for ONNX Runtime, DequantizeLinear for TensorRT."""
        return "nbits" if self.target.compute_capability is None else "dq"

    @property
    def elem_type(self) -> int:
        from onnx import TensorProto  # here: the CLI reads this module's defaults without onnx installed

        return TensorProto.INT8 if self.precision == "int8" else TensorProto.FLOAT8E4M3FN

    @property
    def activation_levels(self) -> float:
        return 127.0 if self.precision == "int8" else FP8_MAX

    @property
    def weight_levels(self) -> float:
        return float(self.target.int8_weight_max) if self.precision == "int8" else FP8_MAX

    @property
    def per_channel_weights(self) -> bool:
        """INT8 GEMMs take a scale per output channel; FP8 ones are calibrated per tensor."""
        return self.precision == "int8"

    def as_json(self) -> dict[str, object]:
        if self.weight_only:
            group = f"a scale per {self.group_size} rows of K and output channel" if self.weight_bits == 4 \
                else "a scale per output channel"
            return {"precision": self.precision, "target": self.target.name, "keep": list(self.keep),
                    "group_size": self.group_size if self.weight_bits == 4 else None, "awq": self.awq,
                    "form": self.form, "weights": f"int{self.weight_bits} symmetric, {group}",
                    "nbits_accuracy_level": self.nbits_accuracy if self.form == "nbits" else None,
                    "activations": "float (weight-only)"}
        return {"precision": self.precision, "target": self.target.name, "method": self.method,
                "percentile": self.percentile if self.method == "percentile" else None,
                "keep": list(self.keep), "smoothquant_alpha": self.smoothquant, "max_noise": self.max_noise,
                "weights": f"{'per-channel' if self.per_channel_weights else 'per-tensor'} symmetric, "
                           f"|q| <= {self.weight_levels:g}",
                "activations": f"per-tensor symmetric, |q| <= {self.activation_levels:g}, zero point 0"}


def make_recipe(precision: str, target_name: str, method: str | None = None, keep: tuple[str, ...] = DEFAULT_KEEP,
                smoothquant: float | None = DEFAULT_SMOOTHQUANT, percentile: float = DEFAULT_PERCENTILE,
                max_noise: float = DEFAULT_MAX_NOISE, group_size: int = DEFAULT_GROUP_SIZE,
                nbits_accuracy: int = DEFAULT_NBITS_ACCURACY) -> Recipe:
    if precision not in PRECISIONS:
        raise SaisaError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    precision = SPELLINGS.get(precision, precision)
    t = target(target_name)
    check_precision(t, precision)
    if precision in WEIGHT_BITS:
        return _weight_only(precision, t, keep, group_size, nbits_accuracy)
    method = method or DEFAULT_METHOD[precision]
    if method not in METHODS:
        raise SaisaError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if precision == "fp8" and method != "max":
        raise SaisaError(f"--method {method}: FP8 scales come from amax (its range needs no clipping search); "
                         "use --method max")
    for k in keep:
        if k not in KEEPABLE:
            raise SaisaError(f"--keep {k!r}: choose from {', '.join(KEEPABLE)}")
    if smoothquant is not None and not 0.0 < smoothquant < 1.0:
        raise SaisaError(f"--smoothquant {smoothquant}: alpha must lie strictly between 0 and 1")
    if not 50.0 < percentile < 100.0:
        raise SaisaError(f"--percentile {percentile}: must lie between 50 and 100")
    if max_noise <= 0:
        raise SaisaError(f"--max-noise {max_noise}: must be positive (a large value quantizes every layer)")
    return Recipe(precision, t, method, tuple(sorted(set(keep))),
                  smoothquant if precision == "int8" else None, percentile, max_noise)


def _weight_only(precision: str, t: Target, keep: tuple[str, ...], group_size: int, nbits_accuracy: int) -> Recipe:
    for k in keep:
        if k not in KEEPABLE:
            raise SaisaError(f"--keep {k!r}: choose from {', '.join(KEEPABLE)}")
    if WEIGHT_BITS[precision] == 4 and (group_size < 16 or group_size & (group_size - 1)):
        raise SaisaError(f"--group-size {group_size}: must be a power of two, at least 16 (ONNX Runtime's "
                         "MatMulNBits and TensorRT's INT4 blocks); 128 is the usual choice")
    if nbits_accuracy not in NBITS_ACCURACY:
        raise SaisaError(f"--nbits-accuracy {nbits_accuracy}: choose 0 (float compute) or 4 (int8 activations)")
    return Recipe(precision, t, "max", tuple(sorted(set(keep))), None, group_size=group_size,
                  nbits_accuracy=nbits_accuracy)
