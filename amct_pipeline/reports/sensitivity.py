"""Sensitivity and mixed-precision reports: a markdown table and PNGs (matplotlib, the ``plots`` extra)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .plot import new_figure, save_figure

__all__ = ["sensitivity_table", "plot_sensitivity", "pareto_table", "plot_pareto"]


def _num(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    return format(value, spec)


def sensitivity_table(result: Mapping[str, Any], limit: int = 0) -> str:
    """Layers most sensitive first (AMCT's ranking), with output effects, FLOPs and bitops."""
    rows = sorted(result["layers"], key=lambda r: r["rank"])
    shown = rows[:limit] if limit else rows
    effects = "sqnr_only_db" in rows[0] if rows else False
    head = ["rank", "layer", "type", "prec", "0.5+0.5cos", "MSE"]
    head += ["SQNR only (dB)", "SQNR all but (dB)"] if effects else []
    head += ["MFLOPs", "Gbitops"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in shown:
        cells = [str(r["rank"]), r["name"], r["op_type"], f"A{r['act_bits'] or 'f'}W{r['wts_bits'] or '-'}",
                 f"{r['cosine_similarity']:.6f}", f"{r['mse']:.3g}"]
        if effects:
            cells += [_num(r["sqnr_only_db"]), _num(r["sqnr_all_but_db"])]
        cells += [_num(r["flops"] / 1e6), _num(r["bitops"] / 1e9)]
        lines.append("| " + " | ".join(cells) + " |")
    total = result["total"]
    lines.append(f"total: {total['flops'] / 1e6:.1f} MFLOPs, {total['bitops'] / 1e9:.2f} Gbitops per sample"
                 + (f"; all layers quantized: {result['all_quantized']['sqnr_db']:.2f} dB output SQNR"
                    if "all_quantized" in result else "")
                 + (f" ({len(rows) - len(shown)} more layers in the JSON)" if len(shown) < len(rows) else ""))
    return "\n".join(lines)


def plot_sensitivity(result: Mapping[str, Any], path: str | Path) -> Path:
    """Per-layer sensitivity bars (1 - (0.5 + 0.5 cos), graph order) beside cumulative bitops."""
    rows = result["layers"]
    figure = new_figure(max(6.4, 0.12 * len(rows) + 2), 4.6)
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    xs = list(range(len(rows)))
    left.bar(xs, [max(1.0 - r["cosine_similarity"], 1e-12) for r in rows], color="tab:red")
    left.set_yscale("log")
    left.set_xlabel("layer (graph order)")
    left.set_ylabel("1 - (0.5 + 0.5 cos)  (higher: more sensitive)")
    left.set_title("AMCT sensitivity per layer")
    total, running = sum(r["bitops"] for r in rows) or 1, 0
    cumulative = []
    for r in rows:
        running += r["bitops"]
        cumulative.append(running / total)
    right.plot(xs, cumulative, marker=".", color="tab:blue")
    right.set_xlabel("layer (graph order)")
    right.set_ylabel("cumulative bitops (fraction of total)")
    right.set_title(f"bitops: {total / 1e9:.2f} G per sample")
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
    return save_figure(figure, path)


def pareto_table(points: Sequence[Mapping[str, Any]], reference_bitops: float) -> str:
    lines = ["| point | bitops vs all-INT8 | output SQNR (dB) | top-1 agreement | layers raised / lowered |",
             "|---|---|---|---|---|"]
    for p in points:
        agreement = "-" if p.get("agreement") is None else f"{100 * p['agreement']:.1f}%"
        lines.append(f"| {p['label']} | {p['bitops'] / reference_bitops:.3f}x | {_num(p['sqnr_db'])} | {agreement} "
                     f"| {p.get('raised', 0)} / {p.get('lowered', 0)} |")
    return "\n".join(lines)


def plot_pareto(points: Sequence[Mapping[str, Any]], front: Sequence[Mapping[str, Any]], reference_bitops: float,
                path: str | Path) -> Path:
    """Every evaluated point and the Pareto front: output SQNR against bitops (relative to all-INT8)."""
    figure = new_figure(6.4, 4.4)
    axes = figure.add_subplot(1, 1, 1)
    axes.scatter([p["bitops"] / reference_bitops for p in points], [p["sqnr_db"] for p in points], s=12,
                 color="tab:grey", alpha=0.6, label="evaluated")
    ordered = sorted(front, key=lambda p: p["bitops"])
    axes.plot([p["bitops"] / reference_bitops for p in ordered], [p["sqnr_db"] for p in ordered], marker="o",
              color="tab:red", label="Pareto front")
    axes.axvline(1.0, color="grey", linestyle="--", label="all INT8")
    axes.set_xlabel("bitops (relative to all-INT8)")
    axes.set_ylabel("output SQNR (dB)")
    axes.set_title("mixed precision: quality vs bit complexity")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    return save_figure(figure, path)
