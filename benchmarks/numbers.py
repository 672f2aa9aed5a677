"""How benchmark tables print a number: fixed decimals, "–" for missing, "∞" for infinite (RESULTS.md, summaries)."""

from __future__ import annotations

import math
from typing import Any


def fmt(x: Any, nd: int = 1) -> str:
    """x with nd decimals; None -> "–"; inf (float or the JSON string "inf") -> "∞"; other strings unchanged."""
    if x is None:
        return "–"
    if isinstance(x, str):
        return "∞" if x == "inf" else x
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{nd}f}"
