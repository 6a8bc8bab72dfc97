"""saisa-edge: SAISA multimodal LLMs from a LLaVA-style checkpoint to fast inference.

Data enters through `saisa_edge.checkpoint` (weights, vision tower, presets) and
`saisa_edge.inputs` (images, conversation templates, tokenisation). The PyTorch
reference lives in `saisa_edge.model`, generation in `saisa_edge.runtime`, and the
later stages in `saisa_edge.export`, `saisa_edge.calibration` and `saisa_edge.plugins`.
"""

__version__ = "0.1.0"

IMAGE_TOKEN_INDEX = -200
"""Id that marks the image inside prompt token ids, as in the original LLaVA code."""

IMAGE_PLACEHOLDER = "<image>"
"""Where the image goes in prompt text."""
