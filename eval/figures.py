"""Matplotlib figures of the aggregator: Figure 4 (Pass@1 vs omega), the attention-dilution
Figures 2 and 3 (plus omega = 1 versus SPA) and Pass@1 against each method's strength (SPA, CFG, CAD, PASTA).

Functions take tidy frames built by ``eval.report`` (one protocol's data per figure; the caller names
the files ``<stem>-<protocol>``) and return a ``Figure``; ``render`` turns it
into PNG and PDF bytes so that the caller writes every output at once. Figures are drawn on
``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so nothing global (backend,
open-figure registry) changes and nothing interactive is needed.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["Figure", "attention_figure", "method_strength_figure", "omega_sweep_figure", "render", "spa_vs_plain_figure",
           "step_axis_end"]

KIND_TITLES = {"self": "Self-attention (last layer)", "gradient": "Gradient-based attention"}


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def step_axis_end(steps: pd.Series, max_step: int) -> int:
    """Right end of a generated-token axis: where the data ends (tokens 0..last step), at most ``max_step``."""
    return max(1, min(int(max_step), int(steps.max()) + 1)) if len(steps) else int(max_step)


def omega_sweep_figure(
    sweep: pd.DataFrame, panels: Sequence[str], colors: Mapping[str, str], title: str | None = None
) -> Figure:
    """One panel per benchmark column: Pass@1 (%) against omega, one line per model, omega = 1 marked.

    ``sweep``: columns model (display name), benchmark, omega, pass_at_1; ``title``: above the panels
    (e.g. the protocol).
    """
    figure = _new_figure(3.6 * len(panels), 3.4)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        data = sweep[sweep["benchmark"] == panel]
        for model, line in data.groupby("model", sort=False):
            line = line.sort_values("omega")
            ax.plot(line["omega"], line["pass_at_1"], marker="o", markersize=3, color=colors.get(model), label=model)
        ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
        if data.empty:
            ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", color="grey")
        ax.set_title(panel)
        ax.set_xlabel("ω (1 = plain model, dashed)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Pass@1 (%)")
    if title:
        figure.suptitle(title)
    _legend_below(figure, axes)
    return figure


def method_strength_figure(
    data: pd.DataFrame, models: Sequence[str], panels: Sequence[str], colors: Mapping[str, str], title: str | None = None
) -> Figure:
    """One panel per model (rows) and benchmark column: Pass@1 (%) against the weight on the full prompt, one
    line per method variant, so that every method's plain model sits at 1 (marked).

    ``data``: columns model (display name), benchmark, method (variant label), weight, pass_at_1.
    """
    figure = _new_figure(3.2 * len(panels), 2.6 * len(models) + 0.8)
    axes = figure.subplots(len(models), len(panels), squeeze=False, sharex=True)
    for row, model in enumerate(models):
        for ax, panel in zip(axes[row], panels):
            mine = data[(data["model"] == model) & (data["benchmark"] == panel)]
            for method, line in mine.groupby("method", sort=False):
                line = line.sort_values("weight")
                ax.plot(line["weight"], line["pass_at_1"], marker="o", markersize=3, color=colors.get(method), label=method)
            ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
            if mine.empty:
                ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", color="grey")
            ax.set_title(f"{model}: {panel}", fontsize="medium")
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("Pass@1 (%)")
    for ax in axes[-1]:
        ax.set_xlabel("weight on the prompt: ω, γ, 1 + α (CAD); PASTA: α")
    if title:
        figure.suptitle(title)
    _legend_below(figure, list(axes.flat))
    return figure


def _legend_below(figure: Figure, axes: Sequence[Axes]) -> None:
    labelled = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    if labelled:
        columns = min(len(labelled), 3)
        figure.legend(labelled.values(), labelled.keys(), loc="outside lower center", ncols=columns, fontsize="small")


def _draw_curves(ax: Axes, curves: pd.DataFrame, series: str, order: Sequence[str], colors: Mapping[str, str]) -> None:
    """A mean line with its 95% band per series value."""
    for name in order:
        line = curves[curves[series] == name].sort_values("step")
        if line.empty:
            continue
        ax.plot(line["step"], line["mean"], color=colors.get(name), linewidth=1.2, label=name)
        ax.fill_between(line["step"], line["low"], line["high"], color=colors.get(name), alpha=0.2, linewidth=0)


def attention_figure(
    curves: pd.DataFrame, order: Sequence[str], colors: Mapping[str, str], title: str, max_step: int
) -> Figure:
    """Figures 2 and 3: % of attention on the prompt per generated token, one line per model with
    a 95% band; a lower panel counts the sequences still generating (the mean gets noisy as they end).
    The token axis ends where the data ends, at most at ``max_step``.

    ``curves``: columns label (model display name), step, mean, low, high, n.
    """
    figure = _new_figure(7.0, 5.0)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    _draw_curves(top, curves, "label", order, colors)
    for name in order:
        alive = curves[curves["label"] == name].sort_values("step")
        bottom.step(alive["step"], alive["n"], where="post", color=colors.get(name), linewidth=1)
    top.set_title(title)
    top.set_ylabel("Attention on the prompt (%)")
    top.grid(alpha=0.3)
    top.legend(fontsize="small")
    bottom.set_ylabel("Sequences\nalive")
    bottom.set_xlabel("Generated tokens")
    bottom.set_xlim(0, step_axis_end(curves["step"], max_step))
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    return figure


def _omega_label(omega: float) -> str:
    return f"ω = {omega:g}"


def spa_vs_plain_figure(curves: pd.DataFrame, models: Sequence[str], max_step: int, title: str | None = None) -> Figure:
    """Per model (columns) and attention kind (rows): omega = 1 against the model's SPA omega(s).
    The token axis ends where the data ends, at most at ``max_step``.

    ``curves``: columns label (model display name), kind, omega, step, mean, low, high.
    """
    end = step_axis_end(curves["step"], max_step)
    kinds = [k for k in KIND_TITLES if k in set(curves["kind"])]
    figure = _new_figure(3.6 * len(models), 2.8 * len(kinds) + 0.4)
    axes = figure.subplots(len(kinds), len(models), squeeze=False, sharex=True)
    for row, kind in enumerate(kinds):
        for col, model in enumerate(models):
            ax = axes[row][col]
            data = curves[(curves["kind"] == kind) & (curves["label"] == model)]
            data = data.assign(series=data["omega"].map(_omega_label))
            omegas = sorted(set(data["omega"]))
            names = [_omega_label(w) for w in omegas]
            # omega = 1 in black in every panel; SPA omegas take the colour cycle.
            colors = {_omega_label(w): "black" if np.isclose(w, 1.0) else f"C{i % 10}" for i, w in enumerate(omegas)}
            _draw_curves(ax, data, "series", names, colors)
            ax.set_title(f"{model}\n{KIND_TITLES[kind]}", fontsize="medium")
            ax.set_xlim(0, end)
            ax.grid(alpha=0.3)
            if names:
                ax.legend(fontsize="small")
        axes[row][0].set_ylabel("Attention on the prompt (%)")
    for ax in axes[-1]:
        ax.set_xlabel("Generated tokens")
    if title:
        figure.suptitle(title)
    return figure


def render(figure: Figure) -> dict[str, bytes]:
    """PNG and PDF bytes; the PDF carries no creation date so reruns give identical files."""
    rendered = {}
    for extension, metadata in (("png", {"Software": None}), ("pdf", {"CreationDate": None})):
        buffer = io.BytesIO()
        figure.savefig(buffer, format=extension, dpi=150, metadata=metadata)
        rendered[extension] = buffer.getvalue()
    return rendered
