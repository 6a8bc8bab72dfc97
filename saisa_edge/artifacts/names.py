"""The names of the graphs' inputs and outputs: the interface between the exporter and every runtime.

  vision.onnx     pixel_values [B, 3, S, S] -> features [B, N, mm_hidden]
  visual_kv.onnx  features, visual_start [B] -> visual_key.{l}, visual_value.{l} [B, KV, N, D]
  decoder.onnx    input_ids, position_ids [B, T], past_positions [B, P], visual_end [Bv],
                  past_key.{l}, past_value.{l} [B, KV, P, D], visual_key.{l}, visual_value.{l}
                  [Bv, KV, N, D] -> logits [B, T, vocab] (fp32), present_positions [B, P+T],
                  present_key.{l}, present_value.{l} [B, KV, P+T, D]

One decoder graph serves prefill (T > 1) and decode (T = 1); N = 0 is text only; a batch
about one image passes Bv = 1. TensorRT engines keep the same names.

The `contrib` decoder form (ONNX Runtime's fused ops) replaces the decoder's interface by

  decoder.onnx    input_ids [B, T], seqlens_k [B] int32 (each row's last slot after this step),
                  total_sequence_length [] int32 (max over rows of seqlens_k + 1),
                  past_key.{l}, past_value.{l} [B, KV, C, D] -> logits [B, T, vocab],
                  present_key.{l}, present_value.{l} [B, KV, C, D]: the same buffer, updated in place

where C is the artifact's max_context and slot p of a row holds its K/V at position p (the image's too).
"""

from __future__ import annotations

GRAPHS = ("vision", "visual_kv", "decoder")  # an artifact's graphs, in the order data flows
INPUT_IDS, POSITION_IDS, PAST_POSITIONS, VISUAL_END = "input_ids", "position_ids", "past_positions", "visual_end"
LOGITS, PRESENT_POSITIONS = "logits", "present_positions"
PIXEL_VALUES, FEATURES, VISUAL_START = "pixel_values", "features", "visual_start"
SEQLENS_K, TOTAL_LENGTH = "seqlens_k", "total_sequence_length"
DECODER_FORMS = ("standard", "contrib")  # the portable NAAViT decoder; ONNX Runtime's fused-op decoder


def past(kind: str, layer: int) -> str:
    return f"past_{kind}.{layer}"


def present(kind: str, layer: int) -> str:
    return f"present_{kind}.{layer}"


def visual(kind: str, layer: int) -> str:
    return f"visual_{kind}.{layer}"
