"""plotly figures for the monitor, the data preview and the Runs tab (pure functions of trainer data)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import plotly.graph_objects as go
from gradio.components.plot import PlotData

from app.views.monitor import Series, ema

_LAYOUT = {
    "height": 300,
    "margin": {"l": 50, "r": 20, "t": 40, "b": 40},
    "legend": {"orientation": "h", "y": -0.25},
    "template": "plotly_white",
}
# The live charts get plotly_white's look spelled out rather than the template itself: a template is 7 KB of
# defaults for 24 trace types that every watching page parses and merges at each redraw of each chart, and its
# axes' automargin has plotly.js measure the tick labels and lay a chart out again. Margins sized for the labels
# and the usual legend instead; a longer legend (a GPU per line) still pushes the bottom margin as it needs
# (benchmarks/page_cpu.py: what a watching page's renderer costs).
_AXIS = {
    "title": {"standoff": 15},
    "gridcolor": "#EBF0F8",
    "linecolor": "#EBF0F8",
    "zerolinecolor": "#EBF0F8",
    "zerolinewidth": 2,
    "ticks": "",
    "automargin": False,
}
_LIVE_LAYOUT = {
    **{k: v for k, v in _LAYOUT.items() if k != "template"},
    "margin": {"l": 80, "r": 20, "t": 40, "b": 125},
    "legend": {"orientation": "h", "y": -0.4},
    "paper_bgcolor": "white",
    "plot_bgcolor": "white",
    "font": {"color": "#2a3f5f"},
    "colorway": ["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692", "#B6E880"],
    "hovermode": "closest",
}
_RIGHT_MARGIN = 70  # a chart with a right axis: its tick labels and title
_NO_LEGEND_BOTTOM = 60  # a chart of one line shows no legend: the x axis's labels and title only


def _fig(title: str, x_title: str = "step", y_title: str = "") -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, **_LAYOUT)
    return fig


# The monitor's four charts are built as the JSON plotly.js reads, not through go.Figure: a watched run redraws them
# on each new metrics line, and go.Figure's validation costs ~15 ms a chart where the dict costs ~1 ms (measured
# with benchmarks/ui_latency.py's --ticks). *_figure() wraps the same dict in a Figure for other callers.
def _spec(title: str, traces: list[dict[str, Any]], y_title: str, **layout: Any) -> dict[str, Any]:
    axes = {"xaxis": _axis("step"), "yaxis": _axis(y_title)}
    margin = {**_LIVE_LAYOUT["margin"], **({"r": _RIGHT_MARGIN} if "yaxis2" in layout else {})}
    if len(traces) == 1:
        margin["b"] = _NO_LEGEND_BOTTOM
    return {
        "data": traces,
        "layout": {**_LIVE_LAYOUT, "margin": margin, "title": {"text": title, "x": 0.05}, **axes, **layout},
    }


def _axis(title: str, **axis: Any) -> dict[str, Any]:
    return {**_AXIS, "title": {**_AXIS["title"], "text": title}, **axis}


def _line(x: list, y: list, name: str, mode: str = "lines", **style: Any) -> dict[str, Any]:
    return {"type": "scatter", "x": x, "y": y, "name": name, "mode": mode, **style}


def _right_axis(title: str, **axis: Any) -> dict[str, Any]:
    return _axis(title, overlaying="y", side="right", **axis)


def loss_spec(s: Series) -> dict[str, Any]:
    """Train loss (raw and smoothed) and eval loss on the same axes."""
    steps, loss = s.train["step"], s.train["loss"]
    raw = _line(steps, loss, "train loss", "lines+markers", opacity=0.45, marker={"size": 4})
    smoothed = _line(steps, ema(loss), "train loss (smoothed)", line={"width": 3})
    return _spec(
        "Loss", [raw, smoothed, _line(s.eval["step"], s.eval["eval_loss"], "eval loss", "lines+markers")], "loss"
    )


def optim_spec(s: Series) -> dict[str, Any]:
    """Learning rate and gradient norm (two y axes) over steps."""
    lr = _line(s.train["step"], s.train["learning_rate"], "learning rate")
    norm = _line(s.train["step"], s.train["grad_norm"], "grad norm", yaxis="y2")
    return _spec("Learning rate and grad norm", [lr, norm], "learning rate", yaxis2=_right_axis("grad norm"))


def speed_spec(s: Series) -> dict[str, Any]:
    tps = _line(s.train["step"], s.train["tokens_per_second"], "tokens/s", "lines+markers")
    return _spec("Throughput", [tps], "tokens/s (real, unpadded)")


def memory_spec(s: Series) -> dict[str, Any]:
    """GPU allocated / reserved / peak against the device total, or process RAM on a CPU machine."""
    sys, steps = s.system, s.system["step"]
    if not any(v is not None for v in sys["gpu_mem_allocated_gb"]):
        rss = _line(steps, sys["cpu_rss_gb"], "process RSS", "lines+markers")
        return _spec("Memory (no GPU: process RAM)", [rss], "GB")
    names = {"gpu_mem_allocated_gb": "allocated", "gpu_mem_reserved_gb": "reserved", "gpu_mem_peak_gb": "peak"}
    traces = [_line(steps, sys[key], name) for key, name in names.items()]
    traces.append(_line(steps, sys["gpu_mem_total_gb"], "device total", line={"dash": "dash"}))
    layout = {}
    if any(v is not None for v in sys["gpu_util_percent"]):
        traces.append(_line(steps, sys["gpu_util_percent"], "GPU util %", yaxis="y2"))
        layout["yaxis2"] = _right_axis("util %", range=[0, 100])
    return _spec("GPU memory", traces + per_gpu_memory(steps, sys["gpus"]), "GB", **layout)


def per_gpu_memory(steps: list, samples: list) -> list[dict[str, Any]]:
    """One line per GPU (memory in use, NVML) when a run spans several: each rank's device, not only rank 0's."""
    indices = sorted({g["index"] for gpus in samples for g in gpus or []})
    if len(indices) < 2:
        return []
    traces = []
    for index in indices:
        used = [next((g["mem_used_gb"] for g in gpus or [] if g["index"] == index), None) for gpus in samples]
        traces.append(_line(steps, used, f"GPU {index} in use", line={"dash": "dot"}))
    return traces


# The monitor's charts, each with the kinds of metrics lines it is drawn from: a chart is rebuilt only when they grow.
MONITOR_CHARTS: dict[str, tuple[Callable[[Series], dict[str, Any]], tuple[str, ...]]] = {
    "loss": (loss_spec, ("train", "eval")),
    "optim": (optim_spec, ("train",)),
    "speed": (speed_spec, ("train",)),
    "memory": (memory_spec, ("system",)),
}


def plot_data(spec: dict[str, Any]) -> PlotData:
    """What gr.Plot sends for a plotly chart, serialized once: the same object can go to every page."""
    return PlotData(type="plotly", plot=json.dumps(spec))


def loss_figure(s: Series) -> go.Figure:
    return go.Figure(loss_spec(s))


def optim_figure(s: Series) -> go.Figure:
    return go.Figure(optim_spec(s))


def speed_figure(s: Series) -> go.Figure:
    return go.Figure(speed_spec(s))


def memory_figure(s: Series) -> go.Figure:
    return go.Figure(memory_spec(s))


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
