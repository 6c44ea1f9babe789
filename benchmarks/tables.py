"""Markdown tables of the benchmark reports, and the machine facts they name."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable

import pandas as pd
import torch


def markdown_table(frame: pd.DataFrame, cell: Callable[[object], str] = str) -> list[str]:
    """The lines of a Markdown table of ``frame``'s columns (its index left out), each value through ``cell``."""
    lines = [
        "| " + " | ".join(map(str, frame.columns)) + " |",
        "| " + " | ".join("---" for _ in frame.columns) + " |",
    ]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return lines


def machine_facts() -> dict[str, object]:
    """The platform, CPU count, PyTorch version and CUDA device (``None`` without one) a benchmark ran on."""
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
