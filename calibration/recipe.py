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
from saisa_edge.targets import Target, check_precision, target

PRECISIONS = ("int8", "fp8")
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

    @property
    def elem_type(self) -> int:
        from onnx import TensorProto  # here, not at the top: the CLI reads this module's defaults at start-up

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
        return {"precision": self.precision, "target": self.target.name, "method": self.method,
                "percentile": self.percentile if self.method == "percentile" else None,
                "keep": list(self.keep), "smoothquant_alpha": self.smoothquant, "max_noise": self.max_noise,
                "weights": f"{'per-channel' if self.per_channel_weights else 'per-tensor'} symmetric, "
                           f"|q| <= {self.weight_levels:g}",
                "activations": f"per-tensor symmetric, |q| <= {self.activation_levels:g}, zero point 0"}


def make_recipe(precision: str, target_name: str, method: str | None = None, keep: tuple[str, ...] = DEFAULT_KEEP,
                smoothquant: float | None = DEFAULT_SMOOTHQUANT, percentile: float = DEFAULT_PERCENTILE,
                max_noise: float = DEFAULT_MAX_NOISE) -> Recipe:
    if precision not in PRECISIONS:
        raise SaisaError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    t = target(target_name)
    check_precision(t, precision)
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
