"""Stage 4: the NAAViT attention kernel and its TensorRT plugin, and engine builds per
target. Consumes export (or calibration) artifacts."""
