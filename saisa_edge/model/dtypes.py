"""The torch dtype of each compute dtype name (config.DTYPE_NAMES), for the export side."""

from __future__ import annotations

import torch

from saisa_edge.config import DTYPE_NAMES

TORCH_DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))
