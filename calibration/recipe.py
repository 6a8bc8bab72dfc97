"""What gets quantized, how, and for which target: one `Recipe` per calibration.

Quantized: every linear layer (MatMul by a `.weight` initializer): weights
per-output-channel symmetric (INT8 and FP8), activations per-tensor symmetric,
zero points 0 - the Q/DQ pattern TensorRT fuses into its INT8/FP8 GEMMs.
Left in the export precision: norms, softmax, RoPE, the NAAViT attention op, the
embedding, and by choice (`keep`) the LM head and the vision tower.
"""

from __future__ import annotations

from dataclasses import dataclass

from saisa_edge.calibration.stats import METHODS
from saisa_edge.errors import SaisaError
from saisa_edge.targets import TENSORRT_INT4_BLOCKS, WEIGHT_ONLY, Target, check_precision, target

PRECISIONS = ("int8", "fp8", "int8_sq", "int8_wo", "int4_awq", "int4_rtn")
SPELLINGS = {"int8_sq": "int8"}  # int8 (W8A8, SmoothQuant) keeps its manifest name; int8_sq is TensorRT-LLM's
WEIGHT_BITS = dict(zip(WEIGHT_ONLY, (8, 4, 4)))  # W8A16 / W4A16 (float activations): bits of the weights
DEFAULT_TEXT_CHUNKS = 8  # prose passages calibrated on after the pairs (calibration.data)
DEFAULT_GROUP_SIZE = 128  # int4 (AWQ's and TensorRT's usual block)
# int8_wo on --target cpu: a scale per 32 rows of K (ONNX Runtime GenAI's int8), where MatMulNBits at
# level 4 also quantizes activations per 32. Measured on smol (contrib form) against a scale per output
# channel repeated per block of 16 (the form before): 250 -> 237 MB read per step, decode 1.04x (LM head
# float; 1.09x quantized), prose top-1 0.967 both, perplexity +0.31% against -0.02% (mark: 1%).
# TensorRT's INT8 weight-only GEMM takes a scale per output channel.
DEFAULT_INT8_GROUP_SIZE = 32
PER_CHANNEL = 0  # --group-size 0: int8 with one scale per output channel (all of K)
# MatMulNBits' accuracy_level: 0 (unset) and 1 compute in fp32, 2 fp16, 3 bf16; 4 quantizes each
# block of activations to int8 on the fly, which ONNX Runtime's x86 kernels need to be fast
# (measured on AVX2 without VNNI: 8-bit decode GEMV 14 ms at level 4, 770-1140 ms at 0-3, fp32 77).
# Measured on smol, text-only: int8_wo top-1 0.934 / ppl +0.60% at level 4, 0.949 / -0.02% at
# level 0 (exact W8A16): neither holds the 0.98 top-1 mark, both the 1% perplexity mark, so the
# default stays the fast level 4 for every format; --nbits-accuracy 0 buys W8A16 exactly.
NBITS_ACCURACY = (0, 1, 2, 3, 4)
DEFAULT_NBITS_ACCURACY = {"int8_wo": 4, "int4_awq": 4, "int4_rtn": 4}
# int4 zero points (uint4, AWQ's form): ONNX Runtime runs them; TensorRT's INT4 DequantizeLinear is
# symmetric and takes blocks of 64 or 128 only, so its targets get symmetric int4 in those blocks
DEFAULT_ASYMMETRIC = True
KEEPABLE = ("lm_head", "vision")
# --lm-head-bits: int4 formats may quantize the LM head at 8 bits, as int8_wo takes it (llama.cpp's
# practice: its Q4_0 and Q4_K_M hold smol's head in Q8_0), or 4. The head is read whole every step
# (smol's tied head: 113 MB in fp32, 63% of int4_awq's bytes a step with it float). int4 on --target
# cpu does so by default: measured on smol, int4_awq decodes 1.31x faster than with the head float
# (152.5 against 116.3 tok/s), prose top-1 0.782 against 0.785, perplexity +21.4% against +21.2%.
# TensorRT targets keep the head float by default (no engine of the mixed form has run here).
LM_HEAD_BITS = (4, 8)
CPU_INT4_LM_HEAD_BITS = 8
DEFAULT_KEEP = ("lm_head",)
DEFAULT_METHOD = {"int8": "percentile", "fp8": "max"}
AUTO = "auto"  # SmoothQuant's alpha chosen per input by measured W8A8 error (calibration.smoothquant)
DEFAULT_SMOOTHQUANT = AUTO
DEFAULT_MAX_NOISE = 0.1
DEFAULT_PERCENTILE = 99.99
FP8_MAX = 448.0  # largest finite float8 e4m3fn
# Where per-output-channel weight scales run (TensorRT: its documentation, not run here: no GPU)
PER_CHANNEL_ACCEPTED_BY = {
    "int8": "TensorRT >= 8 (sm_75+, Orin included): per-channel INT8 weight DQ; ONNX Runtime CPU",
    "fp8": "TensorRT >= 10 on sm_89+ (L4, H100): per-channel FP8 weight DQ, as ModelOpt's ONNX FP8 recipe "
           "writes; ONNX Runtime CPU (folds the weights to float at load)",
}


@dataclass(frozen=True)
class Recipe:
    precision: str
    target: Target
    method: str
    keep: tuple[str, ...]
    smoothquant: float | str | None  # SmoothQuant's alpha, or AUTO (per input); None: no smoothing (always FP8)
    percentile: float = DEFAULT_PERCENTILE
    max_noise: float = DEFAULT_MAX_NOISE  # a linear whose input would lose more (noise/signal) stays in float
    group_size: int | None = DEFAULT_GROUP_SIZE  # rows of K sharing a scale; None: per output channel (int8)
    nbits_accuracy: int = 0  # MatMulNBits' accuracy_level (the cpu form)
    asymmetric: bool = False  # int4 with a zero point per block (uint4)
    lm_head_bits: int | None = None  # weight-only: the LM head's bits; None when it stays float

    @property
    def weight_only(self) -> bool:
        return self.precision in WEIGHT_BITS

    @property
    def weight_bits(self) -> int:
        return WEIGHT_BITS[self.precision]

    @property
    def lm_head_own_bits(self) -> int | None:
        """The LM head's bits when they are not the body's (int4 with --lm-head-bits 8), else None."""
        return self.lm_head_bits if self.lm_head_bits not in (None, self.weight_bits) else None

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
        """A scale per output channel for INT8 and FP8 weights: TensorRT 10 takes per-channel
        weight DQ (axis 1) into both GEMMs (ModelOpt's ONNX FP8 recipe: per-tensor activations,
        per-channel weights), and ONNX Runtime's CPU DequantizeLinear runs both."""
        return True

    def as_json(self) -> dict[str, object]:
        if self.weight_only:
            group = f"a scale per {self.group_size} rows of K and output channel" if self.group_size \
                else "a scale per output channel"
            kind = "uint4 asymmetric (a zero point per block)" if self.asymmetric else \
                f"int{self.weight_bits} symmetric"
            return {"precision": self.precision, "target": self.target.name, "keep": list(self.keep),
                    "group_size": self.group_size, "awq": self.awq, "lm_head_bits": self.lm_head_bits,
                    "form": self.form, "weights": f"{kind}, {group}", "zero_points": self.asymmetric,
                    "nbits_accuracy_level": self.nbits_accuracy if self.form == "nbits" else None,
                    "activations": "float (weight-only)"}
        return {"precision": self.precision, "target": self.target.name, "method": self.method,
                "percentile": self.percentile if self.method == "percentile" else None,
                "keep": list(self.keep), "smoothquant_alpha": self.smoothquant, "max_noise": self.max_noise,
                "weights": f"{'per-channel' if self.per_channel_weights else 'per-tensor'} symmetric, "
                           f"|q| <= {self.weight_levels:g}",
                "weight_scales_accepted_by": PER_CHANNEL_ACCEPTED_BY[self.precision],
                "activations": f"per-tensor symmetric, |q| <= {self.activation_levels:g}, zero point 0"}


def make_recipe(precision: str, target_name: str, method: str | None = None, keep: tuple[str, ...] | None = None,
                smoothquant: float | str | None = DEFAULT_SMOOTHQUANT, percentile: float = DEFAULT_PERCENTILE,
                max_noise: float = DEFAULT_MAX_NOISE, group_size: int | None = None,
                nbits_accuracy: int | None = None, asymmetric: bool | None = None,
                lm_head_bits: int | None = None) -> Recipe:
    if precision not in PRECISIONS:
        raise SaisaError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    precision = SPELLINGS.get(precision, precision)
    t = target(target_name)
    check_precision(t, precision)
    if precision in WEIGHT_BITS:
        return _weight_only(precision, t, keep, group_size, nbits_accuracy, asymmetric, lm_head_bits)
    if lm_head_bits is not None:
        raise SaisaError(f"--lm-head-bits: {precision} quantizes activations too; the flag is for int4_awq/int4_rtn")
    keep = DEFAULT_KEEP if keep is None else keep
    method = method or DEFAULT_METHOD[precision]
    if method not in METHODS:
        raise SaisaError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if precision == "fp8" and method != "max":
        raise SaisaError(f"--method {method}: FP8 scales come from amax (its range needs no clipping search); "
                         "use --method max")
    for k in keep:
        if k not in KEEPABLE:
            raise SaisaError(f"--keep {k!r}: choose from {', '.join(KEEPABLE)}")
    smoothquant = parse_smoothquant(smoothquant)
    if not 50.0 < percentile < 100.0:
        raise SaisaError(f"--percentile {percentile}: must lie between 50 and 100")
    if max_noise <= 0:
        raise SaisaError(f"--max-noise {max_noise}: must be positive (a large value quantizes every layer)")
    return Recipe(precision, t, method, tuple(sorted(set(keep))),
                  smoothquant if precision == "int8" else None, percentile, max_noise)


def parse_smoothquant(value: float | str | None) -> float | str | None:
    """--smoothquant: `auto` (an alpha per input, by measured error), an alpha in (0, 1) for
    every input, or 0 (no smoothing; None)."""
    if value is None or value == AUTO:
        return value
    try:
        alpha = float(value)
    except ValueError:
        raise SaisaError(f"--smoothquant {value!r}: give auto, or an alpha between 0 and 1 (0: no smoothing)") from None
    if alpha == 0.0:
        return None
    if not 0.0 < alpha < 1.0:
        raise SaisaError(f"--smoothquant {value}: alpha must lie strictly between 0 and 1 (or auto; 0: no smoothing)")
    return alpha


def group_size_for(precision: str, t: Target, group_size: int | None) -> int | None:
    """--group-size as the recipe keeps it: rows of K sharing a scale, None for a scale per
    output channel (int8 only: TensorRT's int8 always, --target cpu with --group-size 0)."""
    int4, tensorrt = WEIGHT_BITS[precision] == 4, t.compute_capability is not None
    if group_size is None:
        return DEFAULT_GROUP_SIZE if int4 else None if tensorrt else DEFAULT_INT8_GROUP_SIZE
    if group_size == PER_CHANNEL and not int4:
        return None
    if group_size < 16 or group_size & (group_size - 1):
        kinds = "(ONNX Runtime's MatMulNBits and TensorRT's INT4 blocks); 128 is the usual choice" if int4 else \
            f"(ONNX Runtime's MatMulNBits), or {PER_CHANNEL} for a scale per output channel"
        raise SaisaError(f"--group-size {group_size}: must be a power of two, at least 16 {kinds}")
    if not int4 and tensorrt:
        raise SaisaError(f"--group-size {group_size}: TensorRT's INT8 weight-only GEMM takes a scale per output "
                         f"channel (--target {t.name}); drop the flag (groups run on --target cpu)")
    return group_size


def _weight_only(precision: str, t: Target, keep: tuple[str, ...] | None, group_size: int | None,
                 nbits_accuracy: int | None, asymmetric: bool | None, lm_head_bits: int | None) -> Recipe:
    int4, tensorrt = WEIGHT_BITS[precision] == 4, t.compute_capability is not None
    if keep is None:  # the LM head stays float unless int4 on cpu (in int8) or --lm-head-bits says otherwise
        quantize_head = lm_head_bits is not None or (int4 and not tensorrt)
        keep = tuple(k for k in DEFAULT_KEEP if not (k == "lm_head" and quantize_head))
    for k in keep:
        if k not in KEEPABLE:
            raise SaisaError(f"--keep {k!r}: choose from {', '.join(KEEPABLE)}")
    group_size = group_size_for(precision, t, group_size)
    if lm_head_bits is not None:
        if not int4 or lm_head_bits not in LM_HEAD_BITS:
            raise SaisaError(f"--lm-head-bits {lm_head_bits}: int4_awq and int4_rtn may quantize the LM head at "
                             f"{' or '.join(map(str, LM_HEAD_BITS))} bits; other formats quantize it as the body")
        if "lm_head" in keep:
            raise SaisaError(f"--lm-head-bits {lm_head_bits} with --keep lm_head: the head cannot be both float "
                             "and quantized; drop one")
    if "lm_head" in keep:
        lm_head_bits = None
    elif lm_head_bits is None:
        lm_head_bits = CPU_INT4_LM_HEAD_BITS if int4 and not tensorrt else WEIGHT_BITS[precision]
    if int4 and tensorrt and group_size not in TENSORRT_INT4_BLOCKS:
        raise SaisaError(f"--group-size {group_size}: TensorRT's INT4 blocks are {' or '.join(map(str, TENSORRT_INT4_BLOCKS))}"
                         f" (--target {t.name}); smaller groups run on --target cpu")
    if asymmetric and not int4:
        raise SaisaError(f"--zero-point: {precision} is symmetric; zero points are for int4")
    if asymmetric and tensorrt:
        raise SaisaError(f"--zero-point: TensorRT's INT4 DequantizeLinear is symmetric (--target {t.name}); "
                         "drop the flag (zero points run on --target cpu)")
    level = DEFAULT_NBITS_ACCURACY[precision] if nbits_accuracy is None else nbits_accuracy
    if level not in NBITS_ACCURACY:
        raise SaisaError(f"--nbits-accuracy {level}: choose 0-3 (float compute) or 4 (int8 activations)")
    zero_point = (DEFAULT_ASYMMETRIC and int4 and not tensorrt) if asymmetric is None else asymmetric
    return Recipe(precision, t, "max", tuple(sorted(set(keep))), None, group_size=group_size,
                  nbits_accuracy=level, asymmetric=zero_point, lm_head_bits=lm_head_bits)
