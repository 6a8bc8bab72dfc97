"""The peers' copies of one checkpoint's text decoder, built once and cached in a work folder.

`benchmarks/peers.py` runs the same weights through ONNX Runtime GenAI and llama.cpp. Both
are built here from the saisa-edge checkpoint the artifacts were exported from (for `smol`:
SmolLM2's GGUF weights as `make-checkpoint` stored them), so every system reads the same
numbers: an HF LLaMA folder (config.json, safetensors, tokenizer) for GenAI's model
builder, and an F32 GGUF (llama.cpp's tensor names and Q/K row order) that llama.cpp's own
quantizer turns into Q8_0/Q4_0. Each product is written to a temporary sibling and renamed
into place (`atomic_folder`), under a folder named by the checkpoint's content, so a rerun
reuses them and another checkpoint never does.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saisa_edge.artifacts.folders import atomic_folder
from saisa_edge.checkpoint.loader import load_weights, open_checkpoint
from saisa_edge.errors import SaisaError
from saisa_edge.export.artifact import copy_tokenizer
from saisa_edge.model.equivalence import to_transformers_llama
from saisa_edge.model.llama import SaisaLM

GGUF_FILE = "model.gguf"
BUILT = "peer.json"  # what a cached folder holds and how it was made: its manifest
GENAI_PRECISIONS = ("fp32", "int8", "int4")  # the model builder's -p for each benchmark class
GGUF_TYPES = ("F32", "Q8_0", "Q4_0", "Q4_K_M")
_LLAMA_FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}  # llama.h's LLAMA_FTYPE_MOSTLY_*

# HF LLaMA tensor names -> llama.cpp's (the inverse of saisa_edge.checkpoint.smollm2's table)
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def text_model(checkpoint: Path) -> SaisaLM:
    """The checkpoint's decoder in fp32 (the vision tower is never read)."""
    source = open_checkpoint(checkpoint)
    with torch.device("meta"):
        lm = SaisaLM(source.config)
    load_weights(lm, source, torch.float32)
    return lm.eval()


def source_key(checkpoint: Path) -> str:
    """Names the cache: the manifest's content digest, else the weight files' names, sizes and times."""
    digest = open_checkpoint(checkpoint).content_digest
    if digest is None:
        stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(checkpoint).iterdir()
                       if p.is_file())
        digest = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    return digest[:16]


def write_hf_folder(lm: SaisaLM, checkpoint: Path, out: Path) -> None:
    """An HF `LlamaForCausalLM` folder of the decoder: config.json, safetensors, tokenizer files."""
    model: Any = to_transformers_llama(lm)  # a transformers PreTrainedModel
    eos = list(lm.config.text.eos_token_ids)
    model.config.eos_token_id = model.generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos
    model.save_pretrained(str(out), safe_serialization=True)
    copy_tokenizer(Path(checkpoint), out)


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's rotate-half Q/K rows -> llama.cpp's interleaved pairs (inverse of `unpermute_rope_rows`)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(lm: SaisaLM) -> dict[str, np.ndarray]:
    """The decoder's fp32 weights under llama.cpp's names, Q/K rows in its order."""
    t = lm.config.text
    out: dict[str, np.ndarray] = {}
    for name, value in lm.state_dict().items():
        if "mm_projector" in name or (name == "lm_head.weight" and t.tie_word_embeddings):
            continue
        w = value.detach().float().numpy()
        if name in _GLOBAL:
            out[_GLOBAL[name]] = w
            continue
        parts = name.split(".")  # model.layers.N.<module...>.weight
        kind = _LAYER[".".join(parts[3:-1])]
        if kind in ("attn_q", "attn_k"):
            w = permute_rope_rows(w, t.num_attention_heads if kind == "attn_q" else t.num_key_value_heads)
        out[f"blk.{parts[2]}.{kind}.weight"] = np.ascontiguousarray(w)
    return out


def write_gguf(lm: SaisaLM, vocab_from: Path, out: Path) -> None:
    """An F32 llama GGUF of the decoder; the tokenizer's metadata is copied from `vocab_from`
    (the GGUF the smol weights came from: token ids are fed directly, but llama.cpp needs a vocab)."""
    import gguf

    t = lm.config.text
    if t.rope_scaling is not None or t.attention_bias or t.mlp_bias:
        raise SaisaError(f"{vocab_from}: the GGUF writer handles plain LLaMA decoders (no RoPE scaling, no biases)")
    reader = gguf.GGUFReader(vocab_from)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.contents()) != t.vocab_size:
        raise SaisaError(f"{vocab_from}: its tokenizer does not have the model's {t.vocab_size} tokens")
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_context_length(t.max_position_embeddings)
    writer.add_embedding_length(t.hidden_size)
    writer.add_block_count(t.num_hidden_layers)
    writer.add_feed_forward_length(t.intermediate_size)
    writer.add_head_count(t.num_attention_heads)
    writer.add_head_count_kv(t.num_key_value_heads)
    writer.add_rope_dimension_count(t.head_dim)
    writer.add_rope_freq_base(t.rope_theta)
    writer.add_layer_norm_rms_eps(t.rms_norm_eps)
    writer.add_vocab_size(t.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), kind, sub)
    for name, w in gguf_tensors(lm).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_streamed_bytes(path: Path) -> int:
    """Bytes of the matrices a llama.cpp decode step reads whole, as the file stores them: every
    matrix but the token embedding (a step gathers one row), which counts when it is also the
    output head (a tied GGUF has no `output.weight`)."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors if len(t.shape) >= 2}
    tied = _GLOBAL["lm_head.weight"] not in tensors
    embedding = _GLOBAL["model.embed_tokens.weight"]
    return sum(int(t.n_bytes) for name, t in tensors.items() if name != embedding or tied)


def _cached(out: Path, build: Callable[[Path], dict[str, object]]) -> Path:
    """`out` as built before, else built now into a temporary sibling and renamed into place."""
    if (out / BUILT).is_file():
        return out
    with atomic_folder(out, False, "--work") as tmp:
        details = build(tmp)
        (tmp / BUILT).write_text(json.dumps(details, indent=2))
    return out


def genai_model(hf: Path, precision: str, out: Path) -> Path:
    """ONNX Runtime GenAI's model builder on the HF folder, for the CPU."""
    def build(tmp: Path) -> dict[str, object]:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
                   "-p", precision, "-e", "cpu"]
        with tempfile.TemporaryDirectory(dir=out.parent) as cache:
            run = subprocess.run([*command, "-c", cache], capture_output=True, text=True)
        if run.returncode != 0:
            tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SaisaError(f"{out}: ONNX Runtime GenAI's model builder failed ({tail[0]})")
        return {"tool": "onnxruntime_genai.models.builder", "command": command[1:]}
    return _cached(out, build)


def gguf_model(f32: Path, kind: str, out: Path) -> Path:
    """llama.cpp's quantizer (through llama-cpp-python) on the F32 GGUF."""
    def build(tmp: Path) -> dict[str, object]:
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = _LLAMA_FTYPES[kind], 2
        status = llama_cpp.llama_model_quantize(str(f32 / GGUF_FILE).encode(), str(tmp / GGUF_FILE).encode(),
                                                params)
        if status != 0:
            raise SaisaError(f"{out}: llama.cpp's quantizer failed on {f32 / GGUF_FILE} ({kind}, status {status})")
        return {"tool": "llama_cpp.llama_model_quantize", "ftype": kind, "llama_cpp": llama_cpp.__version__}
    return _cached(out, build)


def prepare(work: Path, checkpoint: Path, vocab_from: Path | None, genai: tuple[str, ...],
            gguf_types: tuple[str, ...]) -> tuple[dict[str, Path], dict[str, Path]]:
    """({GenAI precision: model folder}, {GGUF type: folder holding model.gguf}), built where missing."""
    root = Path(work) / source_key(checkpoint)
    lm: SaisaLM | None = None

    def model() -> SaisaLM:
        nonlocal lm
        lm = lm or text_model(checkpoint)
        return lm

    def hf_build(tmp: Path) -> dict[str, object]:
        write_hf_folder(model(), checkpoint, tmp)
        return {"source": str(checkpoint), "format": "HF LlamaForCausalLM"}

    def f32_build(tmp: Path) -> dict[str, object]:
        if vocab_from is None:
            raise SaisaError("--vocab-gguf: llama.cpp needs a GGUF tokenizer; give the GGUF the weights came from")
        write_gguf(model(), vocab_from, tmp / GGUF_FILE)
        return {"source": str(checkpoint), "vocab_from": str(vocab_from), "ftype": "F32"}

    genai_dirs: dict[str, Path] = {}
    if genai:
        hf = _cached(root / "hf", hf_build)
        genai_dirs = {p: genai_model(hf, p, root / f"genai-{p}") for p in genai}
    gguf_dirs: dict[str, Path] = {}
    if gguf_types:
        f32 = _cached(root / "gguf-F32", f32_build)
        gguf_dirs = {k: f32 if k == "F32" else gguf_model(f32, k, root / f"gguf-{k}") for k in gguf_types}
    return genai_dirs, gguf_dirs
