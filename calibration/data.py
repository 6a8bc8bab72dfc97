"""Image+prompt pairs for calibration and accuracy reports, and the prose the decoder is
calibrated on besides them.

The bundled sets (drawn by `calibration.draw`) are the default: `calibration` to
calibrate, `validation` (other images, other prompts) to measure. A user's folder of
images and a prompt file work the same way; pairs take images and prompts in turn.

Pairs alone starve the decoder's calibration: sixteen short prompts in one chat template
are a few hundred mostly repeated rows. Passages of real prose (as AWQ calibrates on the
Pile and TensorRT-LLM's quantization on news text) give the weight-only searches and the
activation ranges what a chat model reads. Here they come from Python's own reference
manual (`pydoc_data`, shipped with CPython, so offline like everything else), disjoint from
the module docstrings `validate` measures perplexity on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saisa_edge.config import VisionConfig
from saisa_edge.errors import SaisaError
from saisa_edge.evaluation.perplexity import Chunks
from saisa_edge.inputs.image import load_image, preprocess
from saisa_edge.inputs.tokenizer import PromptTokenizer
from saisa_edge.resources import asset

# Reference-manual sections, prose-heavy, in this order; their text varies a little between
# Python versions, so the manifest records its sha256
TEXT_TOPICS = ("execmodel", "naming", "exceptions", "import", "objects", "types", "customization", "truth",
               "context-managers", "dynamic-features", "compound", "class", "function", "try", "with")
TEXT_CONTEXT = 256
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
MIN_IMAGES = 2


@dataclass(frozen=True)
class Pair:
    image: Path
    prompt: str
    pixels: np.ndarray  # preprocessed [3, S, S] float32


def read_prompts(path: Path, flag: str = "--prompts") -> list[str]:
    """Non-empty lines that are not `#` comments."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SaisaError(f"{flag} {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SaisaError(f"{flag} {path}: unreadable ({e}); give a UTF-8 text file, one prompt per line") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise SaisaError(f"{flag} {path}: no usable prompt (one per line; blank and # lines are skipped)")
    return prompts


def image_files(folder: Path, flag: str = "--images") -> list[Path]:
    if not folder.is_dir():
        raise SaisaError(f"{flag} {folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < MIN_IMAGES:
        raise SaisaError(f"{flag} {folder}: {len(files)} image(s) found; at least {MIN_IMAGES} are needed "
                         f"({', '.join(IMAGE_SUFFIXES)})")
    return files


def pairs(vision: VisionConfig, samples: int, images: Path | None = None, prompts: Path | None = None,
          bundled: str = "calibration", pad: bool = True) -> list[Pair]:
    """`samples` pairs: image i mod len(images) with prompt i mod len(prompts)."""
    if samples < 1:
        raise SaisaError(f"--samples {samples}: must be at least 1")
    files = image_files(images or asset(bundled))
    texts = read_prompts(prompts or asset(bundled, "prompts.txt"))
    decoded: dict[Path, np.ndarray] = {}
    out = []
    for i in range(samples):
        f = files[i % len(files)]
        if f not in decoded:
            decoded[f] = preprocess(load_image(f, flag="--images"), vision, pad)
        out.append(Pair(f, texts[i % len(texts)], decoded[f]))
    return out


def calibration_text() -> str:
    try:
        from pydoc_data.topics import topics  # CPython's help() data: imported only to calibrate
    except ImportError:  # some distributions split it off the minimal Python
        raise SaisaError("--text-chunks: this Python lacks pydoc_data (the calibration prose); install its full "
                         "standard library, or pass --text-chunks 0 to calibrate on the pairs alone") from None
    return "\n\n".join(topics[t].strip() for t in TEXT_TOPICS if t in topics)


def text_chunks(tokenizer: PromptTokenizer, chunks: int, max_context: int = TEXT_CONTEXT) -> Chunks:
    """`chunks` passages of TEXT_CONTEXT tokens of the calibration prose (fewer if it runs
    out; shorter where the artifact serves less context)."""
    return Chunks.of(tokenizer, min(TEXT_CONTEXT, max_context), chunks, calibration_text())


def digest(chosen: list[Pair]) -> str:
    """Identifies the data a calibration saw (recorded in the manifest)."""
    h = hashlib.sha256()
    for p in chosen:
        h.update(p.prompt.encode())
        h.update(p.pixels.tobytes())
    return h.hexdigest()
