"""Markdown tables of the benchmark reports."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd


def markdown_table(frame: pd.DataFrame, cell: Callable[[object], str] = str) -> list[str]:
    """The lines of a Markdown table of ``frame``'s columns (its index left out), each value through ``cell``."""
    lines = [
        "| " + " | ".join(map(str, frame.columns)) + " |",
        "| " + " | ".join("---" for _ in frame.columns) + " |",
    ]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return lines
