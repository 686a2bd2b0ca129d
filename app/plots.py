"""plotly figures for the monitor, the data preview and the Runs tab (pure functions of trainer data)."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from trainer.monitor import Series, ema

_LAYOUT = {
    "height": 300,
    "margin": {"l": 50, "r": 20, "t": 40, "b": 40},
    "legend": {"orientation": "h", "y": -0.25},
    "template": "plotly_white",
}


def _fig(title: str, x_title: str = "step", y_title: str = "") -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, **_LAYOUT)
    return fig


def loss_figure(s: Series) -> go.Figure:
    """Train loss (raw and smoothed) and eval loss on the same axes."""
    fig = _fig("Loss", y_title="loss")
    steps, loss = s.train["step"], s.train["loss"]
    fig.add_scatter(x=steps, y=loss, name="train loss", mode="lines+markers", opacity=0.45, marker={"size": 4})
    fig.add_scatter(x=steps, y=ema(loss), name="train loss (smoothed)", mode="lines", line={"width": 3})
    fig.add_scatter(x=s.eval["step"], y=s.eval["eval_loss"], name="eval loss", mode="lines+markers")
    return fig


def optim_figure(s: Series) -> go.Figure:
    """Learning rate and gradient norm (two y axes) over steps."""
    fig = _fig("Learning rate and grad norm", y_title="learning rate")
    fig.add_scatter(x=s.train["step"], y=s.train["learning_rate"], name="learning rate", mode="lines")
    fig.add_scatter(x=s.train["step"], y=s.train["grad_norm"], name="grad norm", mode="lines", yaxis="y2")
    fig.update_layout(yaxis2={"title": "grad norm", "overlaying": "y", "side": "right"})
    return fig


def speed_figure(s: Series) -> go.Figure:
    fig = _fig("Throughput", y_title="tokens/s (real, unpadded)")
    fig.add_scatter(x=s.train["step"], y=s.train["tokens_per_second"], name="tokens/s", mode="lines+markers")
    return fig


def memory_figure(s: Series) -> go.Figure:
    """GPU allocated / reserved / peak against the device total, or process RAM on a CPU machine."""
    sys, steps = s.system, s.system["step"]
    if any(v is not None for v in sys["gpu_mem_allocated_gb"]):
        fig = _fig("GPU memory", y_title="GB")
        for key, name in (
            ("gpu_mem_allocated_gb", "allocated"),
            ("gpu_mem_reserved_gb", "reserved"),
            ("gpu_mem_peak_gb", "peak"),
            ("gpu_mem_total_gb", "device total"),
        ):
            dash = "dash" if key == "gpu_mem_total_gb" else None
            fig.add_scatter(x=steps, y=sys[key], name=name, mode="lines", line={"dash": dash})
        if any(v is not None for v in sys["gpu_util_percent"]):
            fig.add_scatter(x=steps, y=sys["gpu_util_percent"], name="GPU util %", mode="lines", yaxis="y2")
            fig.update_layout(yaxis2={"title": "util %", "overlaying": "y", "side": "right", "range": [0, 100]})
        add_per_gpu_memory(fig, steps, sys["gpus"])
        return fig
    fig = _fig("Memory (no GPU: process RAM)", y_title="GB")
    fig.add_scatter(x=steps, y=sys["cpu_rss_gb"], name="process RSS", mode="lines+markers")
    return fig


def add_per_gpu_memory(fig: go.Figure, steps: list, samples: list) -> None:
    """One line per GPU (memory in use, NVML) when a run spans several: each rank's device, not only rank 0's."""
    indices = sorted({g["index"] for gpus in samples for g in gpus or []})
    if len(indices) < 2:
        return
    for index in indices:
        used = [next((g["mem_used_gb"] for g in gpus or [] if g["index"] == index), None) for gpus in samples]
        fig.add_scatter(x=steps, y=used, name=f"GPU {index} in use", mode="lines", line={"dash": "dot"})


def length_histogram(lengths: list[int], max_length: int) -> go.Figure:
    """Token lengths of the rows, with max_length marked: rows right of the line are truncated or dropped."""
    fig = _fig("Token lengths", x_title="tokens per row", y_title="rows")
    fig.add_histogram(x=lengths, nbinsx=40, name="rows")
    fig.add_vline(x=max_length, line_dash="dash", line_color="red", annotation_text=f"max_length {max_length}")
    fig.update_layout(showlegend=False)
    return fig


def overlay_figure(curves: dict[str, dict[str, list[Any]]]) -> go.Figure:
    """Loss curves of several runs on one chart: {label: {'step': [...], 'loss': [...], 'eval_step', ...}}."""
    fig = _fig("Loss, runs overlaid", y_title="loss")
    for label, c in curves.items():
        fig.add_scatter(x=c["step"], y=ema(c["loss"]), name=f"{label} train (smoothed)", mode="lines")
        if c.get("eval_step"):
            fig.add_scatter(x=c["eval_step"], y=c["eval_loss"], name=f"{label} eval", mode="markers+lines")
    fig.update_layout(height=380)
    return fig


def eval_figure(result: dict[str, Any]) -> go.Figure:
    """Base vs adapter on the held-out rows: exact match and facts stated (bars, left axis), answer loss (right)."""
    who = [w for w in ("base", "adapter") if w in result]
    fig = _fig(f"Held-out: {result.get('rows')} rows of {result.get('data')}", x_title="", y_title="share (%)")
    fig.add_bar(x=who, y=[100 * result[w]["exact_match"] for w in who], name="exact match (%)", offsetgroup=0)
    if all("facts" in result[w] for w in who):
        fig.add_bar(x=who, y=[100 * result[w]["facts"] for w in who], name="facts stated (%)", offsetgroup=1)
    fig.add_bar(x=who, y=[result[w]["loss"] for w in who], name="loss", yaxis="y2", offsetgroup=2)
    fig.update_layout(yaxis2={"title": "loss", "overlaying": "y", "side": "right"}, barmode="group")
    return fig
