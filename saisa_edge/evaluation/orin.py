"""On paper: what each weight format means for a 7-8B SAISA on Jetson Orin.

Decode on Orin is bound by memory bandwidth: each token reads every decoder weight once
(plus the LM head) and the K/V of everything before it, so tokens/s <= bandwidth / bytes
per token. Counted here: decoder linears and per-layer projectors and the vision tower in
the format (the embedding and, by default, the LM head stay fp16), scales included (fp16,
one per output channel, or per `group` rows of K for int4); K/V in fp16 (576 visual
positions plus the text context). Whether it fits: all weights plus visual and text K/V at
the context, against the memory an engine may plan for on the device (`targets.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from saisa_edge.evaluation.flops import CONFIGS, Shapes
from saisa_edge.targets import TARGETS

BANDWIDTH_GBS = {"orin-agx": 204.8, "orin-nx": 102.4, "orin-nano": 68.0}  # LPDDR5, GB/s (10^9)
FORMATS = ("fp16", "int8_sq", "fp8", "int8_wo", "int4_awq")
FP16 = 2.0


def bytes_per_weight(fmt: str, k: int, group: int = 128) -> float:
    """Stored bytes per weight of a [K, N] linear, its scales included."""
    if fmt == "fp16":
        return FP16
    if fmt == "int4_awq":
        return 0.5 + FP16 / group
    if fmt == "fp8":
        return 1.0  # one scale per tensor
    return 1.0 + FP16 / k  # int8: a scale per output channel


def _decoder_linears(s: Shapes) -> list[tuple[int, int]]:
    """[K, N] of every decoder linear (one layer's, times layers)."""
    kv = s.kv_heads * s.head_dim
    one = [(s.hidden, s.heads * s.head_dim + 2 * kv), (s.heads * s.head_dim, s.hidden),
           (s.hidden, 2 * s.intermediate), (s.intermediate, s.hidden)]
    return one * s.layers


def _image_linears(s: Shapes) -> list[tuple[int, int]]:
    """Vision tower and per-layer projectors (depth 2: mm_hidden -> hidden -> hidden)."""
    vision = [(s.vision_hidden, 3 * s.vision_hidden), (s.vision_hidden, s.vision_hidden),
              (s.vision_hidden, s.vision_intermediate), (s.vision_intermediate, s.vision_hidden)] * s.vision_layers
    projector = [(s.vision_hidden, s.hidden)] + [(s.hidden, s.hidden)] * (s.projector_depth - 1)
    return vision + projector * s.layers


def _bytes(linears: list[tuple[int, int]], fmt: str, group: int) -> float:
    return sum(k * n * bytes_per_weight(fmt, k, group) for k, n in linears)


@dataclass(frozen=True)
class Plan:
    model: str
    format: str
    device: str
    weights_gb: float  # everything resident
    kv_gb: float  # visual K/V of one image + text K/V at the context
    bytes_per_token_gb: float  # read per decode step at the end of the context
    tokens_per_s: float  # bandwidth bound
    fits: bool


def plan(model: str, fmt: str, device: str, context: int = 2048, group: int = 128) -> Plan:
    s = CONFIGS[model]
    kv_per_position = 2 * s.layers * s.kv_heads * s.head_dim * FP16
    kv = kv_per_position * (s.patches + context)
    embed = head = s.vocab * s.hidden * FP16
    decoder = _decoder_linears(s)
    weights = _bytes(decoder, fmt, group) + _bytes(_image_linears(s), fmt, group) + embed + head
    per_token = _bytes(decoder, fmt, group) + head + kv
    fits = weights + kv <= TARGETS[device].memory_gib * 2**30
    return Plan(model, fmt, device, round(weights / 1e9, 2), round(kv / 1e9, 2), round(per_token / 1e9, 3),
                round(BANDWIDTH_GBS[device] * 1e9 / per_token, 1), fits)


def table(context: int = 2048) -> list[dict[str, Any]]:
    """Every model x format x device the device can run (Orin has no FP8 tensor cores)."""
    return [asdict(plan(m, f, d, context)) for m in CONFIGS for f in FORMATS for d in BANDWIDTH_GBS
            if f != "fp8" or "fp8" in TARGETS[d].precisions]
