"""Shared fixtures: tiny checkpoints written once per session through the real writer."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from saisa_edge.checkpoint.loader import load_checkpoint
from saisa_edge.checkpoint.presets import tiny, write_checkpoint
from saisa_edge.inputs.image import DEMO_IMAGE  # noqa: F401  (re-exported for the tests)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Test modules of the optional extras, and what each imports from them. Where one is not
# installed (a GPU box with the core package only) the module is not collected; CI installs
# every extra, so there a missing one fails the collection instead of hiding the tests.
EXTRA_MODULES = {
    "test_routing.py": ("fastapi",),
    "test_serve.py": ("fastapi", "uvicorn", "openai"),
    "test_serve_page.py": ("fastapi", "uvicorn", "openai", "selenium"),
    "test_serve_ray.py": ("fastapi", "uvicorn", "openai", "ray"),
}
collect_ignore = [] if os.environ.get("CI") else [
    name for name, needs in EXTRA_MODULES.items() if any(importlib.util.find_spec(m) is None for m in needs)
]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tiny(), tmp_path_factory.mktemp("ckpt") / "tiny", dtype="fp32", preset="tiny")


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory) -> Path:
    """The smol preset (real SmolLM2 weights, projectors fitted), made once per test run: minutes."""
    from click.testing import CliRunner

    from saisa_edge.cli import main

    out = tmp_path_factory.mktemp("smol") / "smol"
    r = CliRunner().invoke(main, ["make-checkpoint", "--preset", "smol", "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def tiny_gqa_dir(tmp_path_factory) -> Path:
    spec = tiny(seed=1, num_attention_heads=6, num_key_value_heads=2, hidden_size=48)
    return write_checkpoint(spec, tmp_path_factory.mktemp("ckpt") / "tiny-gqa", dtype="fp32", preset="tiny")


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_dir):
    return load_checkpoint(tiny_dir)


@pytest.fixture(scope="session")
def tiny_gqa_ckpt(tiny_gqa_dir):
    return load_checkpoint(tiny_gqa_dir)


@pytest.fixture(params=["mha", "gqa"])
def ckpt(request, tiny_ckpt, tiny_gqa_ckpt):
    return tiny_ckpt if request.param == "mha" else tiny_gqa_ckpt


def generate(backend, tokenizer, template, question, pixels, params, max_new_tokens, on_text=None):
    """One request on a fresh session (no caches)."""
    from saisa_edge.runtime.session import Request, Session

    return Session(backend, tokenizer, template).generate(Request(question, pixels, params, max_new_tokens), on_text)
