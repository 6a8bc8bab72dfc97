"""Stage 2: checkpoint -> ONNX artifact folder.

`graph` builds ONNX graphs node by node and streams weights to disk; `naavit` defines
the `saisa::NAAViTAttention` op (its contract, its standard-op function body, and the
variants for TensorRT); `layers` holds the ONNX twins of the reference model's pieces;
`graphs` assembles vision.onnx, visual_kv.onnx and decoder.onnx; `artifact` writes the
folder with its manifest, and reads it back for the runtime.
"""
