"""
matplotlib for the experiments' figures: one loader, so every figure is drawn on the same
file-only backend and matplotlib stays an optional extra (``pip install .[plots]``).
"""
from __future__ import annotations

from typing import Any


def pyplot(required: bool = True) -> Any:
    """
    ``matplotlib.pyplot`` on the Agg backend (files only, no display needed).

    :param required: when False and matplotlib is not installed, return None (the caller skips its
        figures and keeps its tables); when True, raise an ImportError that names the extra.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        if not required:
            return None
        raise ImportError("the figures need matplotlib: pip install '.[plots]'") from e
    return plt
