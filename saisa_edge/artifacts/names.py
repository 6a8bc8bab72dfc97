"""The names of the graphs' inputs and outputs: the interface between the exporter and every runtime.

  vision.onnx     pixel_values [B, 3, S, S] -> features [B, N, mm_hidden]
  visual_kv.onnx  features, visual_start [B] -> visual_key.{l}, visual_value.{l} [B, KV, N, D]
  decoder.onnx    input_ids, position_ids [B, T], past_positions [B, P], visual_end [Bv],
                  past_key.{l}, past_value.{l} [B, KV, P, D], visual_key.{l}, visual_value.{l}
                  [Bv, KV, N, D] -> logits [B, T, vocab] (fp32), present_positions [B, P+T],
                  present_key.{l}, present_value.{l} [B, KV, P+T, D]

One decoder graph serves prefill (T > 1) and decode (T = 1); N = 0 is text only; a batch
about one image passes Bv = 1. TensorRT engines keep the same names.
"""

from __future__ import annotations

GRAPHS = ("vision", "visual_kv", "decoder")  # an artifact's graphs, in the order data flows
INPUT_IDS, POSITION_IDS, PAST_POSITIONS, VISUAL_END = "input_ids", "position_ids", "past_positions", "visual_end"
LOGITS, PRESENT_POSITIONS = "logits", "present_positions"
PIXEL_VALUES, FEATURES, VISUAL_START = "pixel_values", "features", "visual_start"


def past(kind: str, layer: int) -> str:
    return f"past_{kind}.{layer}"


def present(kind: str, layer: int) -> str:
    return f"present_{kind}.{layer}"


def visual(kind: str, layer: int) -> str:
    return f"visual_{kind}.{layer}"
