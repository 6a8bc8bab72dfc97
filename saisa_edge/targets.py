"""Deployment targets: what each device can run and how much room an engine build gets.

One table serves calibration (which precisions a target accepts, how its int8
weights are stored) and engine builds (compute capability, memory, workspace).
"""

from __future__ import annotations

from dataclasses import dataclass

from saisa_edge.errors import SaisaError


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    compute_capability: tuple[int, int] | None  # None: ONNX Runtime on the CPU
    memory_gib: float  # device memory an engine may plan for (Jetson: shared with the CPU)
    workspace_gib: float  # TensorRT builder workspace
    precisions: tuple[str, ...]  # of the weights/activations in a graph: fp32, fp16, bf16, int8, fp8
    int8_weight_max: int = 127  # largest |int8| weight: 63 on x86 CPUs, whose u8s8 kernels saturate at 127

    @property
    def sm(self) -> str:
        return "cpu" if self.compute_capability is None else "sm_{}{}".format(*self.compute_capability)

    @property
    def is_jetson(self) -> bool:
        return self.name.startswith("orin")


WEIGHT_ONLY = ("int8_wo", "int4_awq", "int4_rtn")  # float activations: any target with float GEMMs
TENSORRT_INT4_BLOCKS = (64, 128)  # the block sizes TensorRT's INT4 DequantizeLinear takes (symmetric only)
_AMPERE = ("fp32", "fp16", "bf16", "int8", *WEIGHT_ONLY)
_ADA_HOPPER = (*_AMPERE, "fp8")
TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("orin-agx", "Jetson AGX Orin (64 GB)", (8, 7), 48.0, 4.0, _AMPERE),
    Target("orin-nx", "Jetson Orin NX (16 GB)", (8, 7), 12.0, 2.0, _AMPERE),
    Target("orin-nano", "Jetson Orin Nano (8 GB)", (8, 7), 5.0, 1.0, _AMPERE),
    Target("a100", "A100 (80 GB)", (8, 0), 76.0, 8.0, _AMPERE),
    Target("l4", "L4 (24 GB)", (8, 9), 22.0, 4.0, _ADA_HOPPER),
    Target("h100", "H100 (80 GB)", (9, 0), 76.0, 8.0, _ADA_HOPPER),
    Target("cpu", "ONNX Runtime on an x86-64 CPU", None, 0.0, 0.0, ("fp32", "fp16", "int8", "fp8", *WEIGHT_ONLY),
           int8_weight_max=63),
)}


def target(name: str, flag: str = "--target") -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise SaisaError(f"{flag} {name!r} is unknown; choose one of {', '.join(TARGETS)}") from None


def by_compute_capability(major: int, minor: int) -> Target:
    """The preset for a GPU found at run time (`--target auto`)."""
    for t in TARGETS.values():
        if t.compute_capability == (major, minor):
            return t
    raise SaisaError(f"--target auto: no preset for compute capability {major}.{minor}; "
                     f"name one of {', '.join(n for n in TARGETS if n != 'cpu')}")


def check_precision(t: Target, precision: str) -> None:
    if precision in t.precisions:
        return
    if precision == "fp8":
        hint = "use --precision int8" if t.is_jetson or t.compute_capability == (8, 0) else "choose another precision"
        raise SaisaError(f"--precision fp8: {t.description} ({t.sm}) has no FP8 tensor cores; {hint}")
    raise SaisaError(f"--precision {precision}: {t.description} cannot run it; choose one of {', '.join(t.precisions)}")
