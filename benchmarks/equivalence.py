"""Measured equivalence errors of the PyTorch reference, as JSON.

    python benchmarks/equivalence.py                 # tiny MHA and GQA checkpoints
    python benchmarks/equivalence.py --smol DIR      # also a smol checkpoint (make-checkpoint --preset smol)

For each checkpoint, in fp32: max abs logit error of `split` vs `original` (image and
text-only prefill), whether 32 greedy tokens agree, text path vs transformers'
LlamaForCausalLM, vision path vs transformers' CLIPVisionModel, and the text-as-image
check (each layer fed LLaMA's own hidden states of a passage) vs transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from saisa_edge.checkpoint.loader import Checkpoint, load_checkpoint
from saisa_edge.checkpoint.presets import tiny, write_checkpoint
from saisa_edge.inputs.conversation import get_template
from saisa_edge.inputs.image import DEMO_IMAGE, load_image, preprocess
from saisa_edge.model.equivalence import (
    greedy, split_vs_original, text_as_image_vs_transformers, text_vs_transformers, vision_vs_transformers,
)
from saisa_edge.runtime.session import user_message



def measure(ckpt: Checkpoint) -> dict[str, object]:
    t0 = time.perf_counter()
    tok = ckpt.tokenizer
    template = get_template(tok.default_conv_mode())
    pixels = torch.from_numpy(preprocess(load_image(DEMO_IMAGE), ckpt.config.vision))[None]
    features = ckpt.vision(pixels)
    ids = tok.encode(template.prompt([(user_message("What is shown in this image?", True), None)]))
    text_ids = tok.encode(template.prompt([("What is the capital of France?", None)]))
    ours, theirs = greedy(ckpt.lm, ids, features, 32)
    before, after = template.prompt([(user_message("Summarise the passage.", True), None)]).split("<image>")
    skip = 1 if tok.tokenize(before)[:1] == [tok.bos_id] else 0
    passage = tok.tokenize("Paris is the capital and largest city of France, on the river Seine.")[skip:]
    return {
        "layers": ckpt.config.text.num_hidden_layers,
        "heads": [ckpt.config.text.num_attention_heads, ckpt.config.text.num_key_value_heads],
        "visual_tokens": ckpt.config.num_visual_tokens,
        "split_vs_original_image": split_vs_original(ckpt.lm, ids, features),
        "split_vs_original_text_only": split_vs_original(ckpt.lm, text_ids, None),
        "greedy_32_identical": ours == theirs,
        "text_vs_transformers_llama": text_vs_transformers(ckpt.lm, text_ids),
        "vision_vs_transformers_clip": vision_vs_transformers(ckpt.vision, ckpt.vision_tower_path, ckpt.config, pixels),
        "text_as_image_vs_transformers_llama": text_as_image_vs_transformers(
            ckpt.lm, tok.tokenize(before), passage, tok.tokenize(after)[skip:]
        ),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smol", type=Path, help="a checkpoint made with `make-checkpoint --preset smol`")
    args = ap.parse_args()
    torch.manual_seed(0)
    report: dict[str, object] = {"dtype": "fp32", "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        specs = {"tiny_mha": tiny(), "tiny_gqa": tiny(seed=1, num_attention_heads=6, num_key_value_heads=2, hidden_size=48)}
        for name, spec in specs.items():
            report[name] = measure(load_checkpoint(write_checkpoint(spec, Path(tmp) / name, dtype="fp32")))
            print(f"measured {name}", file=sys.stderr)
        if args.smol:
            report["smol"] = measure(load_checkpoint(args.smol))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
