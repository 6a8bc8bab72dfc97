"""Stage 2: checkpoint -> ONNX artifact folder (vision, visual K/V, decoder graphs with
the `saisa::NAAViTAttention` op). Consumes `saisa_edge.checkpoint`, feeds calibration,
the TensorRT build and the ONNX Runtime backend."""
