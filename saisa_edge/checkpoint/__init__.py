"""Where data enters: checkpoint folders (weights, config, tokenizer, vision tower) and presets."""

from saisa_edge.checkpoint.loader import Checkpoint, load_checkpoint

__all__ = ["Checkpoint", "load_checkpoint"]
