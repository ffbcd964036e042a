"""What every check receives: one variant's tiny checkpoint, loaded on both sides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .schema import CheckResult, Variant


@dataclass
class Subject:
    model_type: str
    variant: Variant
    checkpoint: Path
    config: dict[str, Any]  # the config.json both libraries loaded
    dtype: str  # compute dtype of this run
    seed: int
    hf_model: Any  # transformers model, eval mode, `dtype`
    mlx_model: Any  # mlx-lm model, `dtype`
    ids: np.ndarray  # the parity prompt, shape (1, tokens)
    # this variant runs the default's checks too, the default variant not loading
    # (engine.verify): checks that treat other variants apart treat it as the default
    stands_in: bool = False

    def result(self, check: str, **fields: Any) -> CheckResult:
        return CheckResult(check=check, variant=self.variant.name, **fields)
