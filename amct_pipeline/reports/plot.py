"""The accuracy-versus-FLOPs PNG. matplotlib is the optional extra ``plots``, imported only here."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

from ..errors import ConfigError

__all__ = ["require_matplotlib", "new_figure", "save_figure", "plot_tradeoff"]


def require_matplotlib() -> None:
    """Fail before any work when a plot is asked for and matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("a plot was asked for but matplotlib is not installed; "
                          "pip install 'amct-pipeline[plots]' or drop the plot option") from None


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (object API: no global pyplot state)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str | Path) -> Path:
    figure.tight_layout()
    path = Path(path)
    figure.savefig(str(path), format="png")
    return path


def plot_tradeoff(series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, *,
                  ylabel: str = "output SQNR (dB)", xlabel: str = "FLOPs kept in decomposed layers (fraction)",
                  title: str = "", baseline: Optional[float] = None) -> Path:
    """One line per series of (x, y) points; ``baseline`` draws the float model's figure."""
    figure = new_figure(6.4, 4.2)
    axes = figure.add_subplot(1, 1, 1)
    for label, points in series.items():
        ordered = sorted(points)
        axes.plot([p[0] for p in ordered], [p[1] for p in ordered], marker="o", label=label)
    if baseline is not None:
        axes.axhline(baseline, color="grey", linestyle="--", label="float model")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    return save_figure(figure, path)
