"""Stage 6: how good and how fast - validation against the PyTorch reference, benchmarks,
and SAISA's analytic FLOPs next to the LLaVA-1.5 layout."""
