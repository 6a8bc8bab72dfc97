"""fp16 and bf16 numerics of the PyTorch reference on a GPU, against fp32 on the CPU, as JSON.

    python scripts/gpu_numerics.py                 # a GPU (falls back to the CPU, bf16 only)

Random tiny-preset checkpoints (MHA, and a wider GQA 8/2 one) with the demo image: the
prefill logits of `split` in half precision on the device against `split` and `original`
in fp32 on the CPU (max abs error, relative L2 error, top-1 agreement per position), the
vision tower likewise, and how many of 32 greedy tokens agree. It bounds what the
engines' fp16 builds can be held to by `validate`.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

from saisa_edge.checkpoint.loader import load_checkpoint
from saisa_edge.checkpoint.presets import tiny, write_checkpoint
from saisa_edge.inputs.conversation import get_template
from saisa_edge.inputs.image import DEMO_IMAGE, load_image, preprocess
from saisa_edge.model import original
from saisa_edge.model.equivalence import split_greedy, split_prefill
from saisa_edge.runtime.session import user_message

SPECS = {
    "tiny MHA": {},
    "wide GQA 8/2": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
                     "num_attention_heads": 8, "num_key_value_heads": 2},
}


def compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    got, want = got.double().cpu(), want.double().cpu()
    return {
        "max_abs": float((got - want).abs().max()),
        "rel_l2": float((got - want).norm() / want.norm()),
        "top1": float((got.argmax(-1) == want.argmax(-1)).double().mean()),
    }


@torch.no_grad()
def measure(name: str, overrides: dict[str, int], root: Path, device: str, dtypes: list[torch.dtype]) -> dict:
    ckpt = load_checkpoint(write_checkpoint(tiny(**overrides), root / name.replace(" ", "-"), dtype="fp32",
                                            preset="tiny"))
    tok = ckpt.tokenizer
    template = get_template(tok.default_conv_mode())
    pixels = torch.from_numpy(preprocess(load_image(DEMO_IMAGE), ckpt.config.vision))[None]
    features = ckpt.vision(pixels)
    ids = tok.encode(template.prompt([(user_message("What is shown in this image?", True), None)]))
    want = split_prefill(ckpt.lm, ids, features)[0]
    result: dict[str, object] = {
        "split_vs_original_fp32_cpu": compare(want, original.forward(ckpt.lm, ids, features[0])),
    }
    want_tokens = split_greedy(ckpt.lm, ids, features, 32)
    for dtype in dtypes:
        lm, vision = copy.deepcopy(ckpt.lm).to(device, dtype), copy.deepcopy(ckpt.vision).to(device, dtype)
        with torch.device(device):  # the reference allocates caches and positions on the default device
            feats = vision(pixels.to(device, dtype))
            got = split_prefill(lm, ids, feats)[0]
            tokens = split_greedy(lm, ids, feats, 32)
        result[str(dtype).removeprefix("torch.")] = {
            "vision": compare(feats, features),
            "prefill_logits": compare(got, want),
            "greedy_agree_of_32": sum(a == b for a, b in zip(tokens, want_tokens)),
            "greedy_prefix_agree": next((i for i, (a, b) in enumerate(zip(tokens, want_tokens)) if a != b), 32),
        }
    return result


def main() -> int:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtypes = [torch.float16, torch.bfloat16] if cuda else [torch.bfloat16]
    report: dict[str, object] = {"device": torch.cuda.get_device_name() if cuda else "cpu",
                                 "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in SPECS.items():
            report[name] = measure(name, overrides, Path(tmp), device, dtypes)
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
