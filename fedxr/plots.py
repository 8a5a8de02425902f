"""One way to make a PNG plot: a figure that is laid out, saved and closed whatever happens inside."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


def pyplot():
    """matplotlib's pyplot on the Agg backend: plots are files, and no display is needed or opened."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def saved_figure(path: str | Path, dpi: int = 100, layout_rect: tuple | None = None, **subplots) -> Iterator[tuple]:
    """``with saved_figure(path, figsize=(7, 4)) as (fig, ax): ...`` — ``subplots`` go to
    ``plt.subplots`` (``nrows``, ``ncols``, ``figsize``, ``squeeze``, ...). On leaving the block the figure is
    laid out (``tight_layout``, within ``layout_rect`` when given), written to ``path`` and closed; it is
    closed on an error too, so a failed plot leaves no figure behind."""
    plt = pyplot()
    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout(**({"rect": layout_rect} if layout_rect else {}))
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
