"""Dtype names, defined once: the short names recipes and CLIs take, and the names HF config.json writes."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Short names (recipes, `--dtype` flags) -> torch dtypes."""

HF_DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                                          torch.float16: "float16"}
"""torch dtypes -> the names config.json carries (`torch_dtype` in transformers 4.x, `dtype` in 5.x)."""

