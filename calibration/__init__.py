"""Stage 3: ONNX artifact -> INT8/FP8 artifact with explicit Q/DQ, calibrated on
image+prompt pairs run through the pipeline."""
