"""Plotly figures for the lab: speed of a generation, memory over time, rooflines, bars, images.

Pure functions: data in, `go.Figure` out (`widget=True` gives a `go.FigureWidget` that a
widget or a background thread can update in place). Bytes stay bytes in the traces (the axes
format them), so a figure's data can be checked against the allocator's numbers exactly.
"""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

TAG_COLORS = {"weights": "#1f77b4", "kv_cache": "#ff7f0e", "activations": "#2ca02c",
              "scratch": "#9467bd", "other": "#7f7f7f"}
BYTES_AXIS = dict(tickformat=".3~s", ticksuffix="B", rangemode="tozero")


def _figure(widget: bool, fig: go.Figure | None = None):
    fig = fig if fig is not None else go.Figure()
    return go.FigureWidget(fig) if widget else fig


# ----------------------------------------------------------------------------- tokens/s

def decode_rates(token_times, window: int = 4) -> np.ndarray:
    """Tokens/s after each decoded token, smoothed over `window` tokens.

    token_times: seconds since the request started at which each token (piece) arrived [n].
    The first token pays for the prefill, so rates start at the second token: [n-1].
    """
    t = np.asarray(token_times, dtype=np.float64)
    if t.ndim != 1:
        raise ValueError(f"token_times must be 1-D, got shape {t.shape}")
    if t.size < 2:
        return np.zeros(0)
    rates = np.empty(t.size - 1)
    for i in range(1, t.size):
        j = max(0, i - window)
        dt = t[i] - t[j]
        rates[i - 1] = (i - j) / dt if dt > 0 else math.inf
    return rates


def generation_speed(token_times, prompt_tokens: int | None = None,
                     prompt_tokens_per_second: float | None = None, window: int = 4,
                     title: str = "Where the time goes in a generation", widget: bool = False):
    """Prefill vs decode throughput (bars) and decode tokens/s over the generation (line).

    token_times: arrival time of each generated token, seconds since the request began.
    Prefill speed is `prompt_tokens_per_second` when given, else prompt_tokens / first-token time.
    """
    t = np.asarray(token_times, dtype=np.float64)
    if t.size == 0:
        raise ValueError("generation_speed: no tokens were timed")
    if prompt_tokens_per_second is None and prompt_tokens:
        prompt_tokens_per_second = prompt_tokens / t[0] if t[0] > 0 else math.inf
    rates = decode_rates(t, window)
    decode_avg = (t.size - 1) / (t[-1] - t[0]) if t.size > 1 and t[-1] > t[0] else 0.0

    fig = make_subplots(rows=1, cols=2, column_widths=[0.25, 0.75], horizontal_spacing=0.12,
                        subplot_titles=("prefill vs decode", "decode speed over the answer"))
    fig.add_bar(x=["prefill", "decode"], y=[float(prompt_tokens_per_second or 0.0), float(decode_avg)],
                marker_color=["#9467bd", "#1f77b4"], showlegend=False,
                text=[f"{prompt_tokens_per_second or 0:.0f}", f"{decode_avg:.1f}"], textposition="auto",
                row=1, col=1)
    fig.add_scatter(x=np.arange(2, t.size + 1), y=rates, mode="lines+markers", name="tokens/s",
                    line=dict(color="#1f77b4"), row=1, col=2)
    if decode_avg:
        fig.add_hline(y=decode_avg, line_dash="dot", line_color="#888",
                      annotation_text=f"mean {decode_avg:.1f} tok/s", row=1, col=2)
    fig.update_yaxes(title_text="tokens / s", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="tokens / s", rangemode="tozero", row=1, col=2)
    fig.update_xaxes(title_text="token", row=1, col=2)
    fig.update_layout(title=title, height=360, margin=dict(t=70, b=40))
    return _figure(widget, fig)


# ----------------------------------------------------------------------------- memory

def memory_timeline(series, tags=None, title: str = "Memory over time",
                    budget: int | None = None, widget: bool = False):
    """Bytes in use over time, one stacked area per tag.

    series: `Allocator.track()`'s `Tracker.series`, [(seconds, in_use, {tag: bytes})].
    """
    series = list(series)
    seen = set().union(*(s[2].keys() for s in series)) if series else set()
    if tags is None:
        tags = [t for t in TAG_COLORS if t in seen] + sorted(seen - set(TAG_COLORS))
    x = [float(s[0]) for s in series]
    fig = go.Figure()
    for tag in tags:
        fig.add_scatter(x=x, y=[int(s[2].get(tag, 0)) for s in series], name=tag, mode="lines",
                        stackgroup="memory", line=dict(width=0.5, color=TAG_COLORS.get(tag)))
    fig.add_scatter(x=x, y=[int(s[1]) for s in series], name="in use", mode="lines",
                    line=dict(color="black", width=1.5, dash="dot"))
    if budget:
        fig.add_hline(y=budget, line_dash="dash", line_color="red", annotation_text="budget")
    fig.update_layout(title=title, xaxis_title="seconds", yaxis=BYTES_AXIS, height=340,
                      margin=dict(t=60, b=40), legend=dict(orientation="h", y=-0.25))
    return _figure(widget, fig)


def memory_bars(by_tag: dict, title: str = "Memory by tag", widget: bool = False):
    """One bar per tag (bytes in use now)."""
    tags = list(by_tag)
    fig = go.Figure(go.Bar(x=tags, y=[int(by_tag[t]) for t in tags],
                           marker_color=[TAG_COLORS.get(t, "#7f7f7f") for t in tags]))
    fig.update_layout(title=title, yaxis=BYTES_AXIS, height=300, margin=dict(t=60, b=40))
    return _figure(widget, fig)


# ----------------------------------------------------------------------------- roofline

def roofline(points, peak_gflops: float, bandwidth_gbs, title: str = "Roofline",
             widget: bool = False):
    """A log-log roofline: attainable GFLOP/s = min(peak, bandwidth * intensity), plus measured points.

    points: iterable of (name, flops_per_byte, achieved_gflops) or dicts with those keys
            ("name", "intensity", "gflops").
    bandwidth_gbs: one memory bandwidth in GB/s, or {label: GB/s} for several roofs.
    """
    if peak_gflops <= 0:
        raise ValueError(f"peak_gflops must be > 0, got {peak_gflops}")
    roofs = bandwidth_gbs if isinstance(bandwidth_gbs, dict) else {"memory": bandwidth_gbs}
    pts = []
    for p in points:
        if isinstance(p, dict):
            pts.append((str(p["name"]), float(p["intensity"]), float(p["gflops"])))
        else:
            name, ai, gf = p
            pts.append((str(name), float(ai), float(gf)))
    lo = min([0.01] + [ai / 4 for _, ai, _ in pts if ai > 0])
    hi = max([1000.0] + [ai * 4 for _, ai, _ in pts])
    x = np.logspace(math.log10(lo), math.log10(hi), 200)
    fig = go.Figure()
    for label, bw in roofs.items():
        if bw <= 0:
            raise ValueError(f"bandwidth for {label!r} must be > 0, got {bw}")
        fig.add_scatter(x=x, y=np.minimum(float(peak_gflops), float(bw) * x), mode="lines",
                        name=f"{label}: {bw:g} GB/s", line=dict(width=2))
    ridge = float(peak_gflops) / max(roofs.values())
    fig.add_annotation(x=math.log10(ridge), y=math.log10(peak_gflops), text=f"peak {peak_gflops:g} GFLOP/s",
                       showarrow=False, yshift=10, xanchor="left")
    if pts:
        fig.add_scatter(x=[p[1] for p in pts], y=[p[2] for p in pts], mode="markers+text",
                        text=[p[0] for p in pts], textposition="top center", name="measured",
                        marker=dict(size=10, color="#d62728"))
    fig.update_layout(title=title, height=420, margin=dict(t=60, b=50),
                      xaxis=dict(type="log", title="arithmetic intensity (FLOP / byte)"),
                      yaxis=dict(type="log", title="GFLOP / s"))
    return _figure(widget, fig)


# ----------------------------------------------------------------------------- bars

def bar_chart(values: dict, title: str = "", yaxis_title: str = "", widget: bool = False):
    """Bars from {label: number}, or grouped bars from {series: {label: number}} (ROUGE, timings)."""
    if not values:
        raise ValueError("bar_chart: no values to plot")
    fig = go.Figure()
    first = next(iter(values.values()))
    if isinstance(first, dict):
        for series, row in values.items():
            fig.add_bar(name=str(series), x=list(row), y=[float(v) for v in row.values()],
                        text=[f"{v:.3g}" for v in row.values()], textposition="auto")
        fig.update_layout(barmode="group")
    else:
        fig.add_bar(x=list(values), y=[float(v) for v in values.values()],
                    text=[f"{v:.3g}" for v in values.values()], textposition="auto")
    fig.update_layout(title=title, yaxis_title=yaxis_title, height=340, margin=dict(t=60, b=40))
    return _figure(widget, fig)


# ----------------------------------------------------------------------------- images

def to_uint8_image(img) -> np.ndarray:
    """PIL image or array ([H, W], [H, W, C] in 0..255, or float in 0..1) -> uint8 [H, W, 3]."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be [H, W], [H, W, 1|3|4], got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    a = a[:, :, :3]
    if a.dtype != np.uint8:
        a = np.asarray(a, dtype=np.float32)
        if a.max(initial=0.0) <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return a


def image_grid(images, titles=None, cols: int = 4, title: str = "", widget: bool = False):
    """Images side by side in rows of `cols`, each with an optional title."""
    images = [to_uint8_image(im) for im in images]
    if not images:
        raise ValueError("image_grid: no images")
    cols = max(1, min(cols, len(images)))
    rows = math.ceil(len(images) / cols)
    titles = [str(t) for t in titles] if titles is not None else None
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles,
                        horizontal_spacing=0.02, vertical_spacing=0.08 if titles else 0.02)
    for i, im in enumerate(images):
        fig.add_trace(go.Image(z=im), row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    side = 200
    fig.update_layout(title=title, height=rows * side + (60 if title else 20), width=cols * side + 40,
                      margin=dict(l=10, r=10, t=60 if title else 30, b=10))
    return _figure(widget, fig)


# ----------------------------------------------------------------------------- planner

def plan_table(plans, title: str = "Will it fit?", widget: bool = False):
    """A table of `planner.Plan`s: memory parts, and whether (and how long a context) fits."""
    from .memory import fmt_bytes
    plans = list(plans)
    yes = {True: "yes", False: "no"}
    cols = {
        "model": [p.model for p in plans],
        "context": [p.context for p in plans],
        "weights": [fmt_bytes(p.weights) for p in plans],
        "KV cache": [fmt_bytes(p.kv_cache) for p in plans],
        "total": [fmt_bytes(p.total) for p in plans],
        "fits here": [yes[p.fits_here] for p in plans],
        "longest context here": [p.max_context_here for p in plans],
        "fits Spark": [yes[p.fits_spark] for p in plans],
        "longest context Spark": [p.max_context_spark for p in plans],
    }
    fill = [["#e8f5e9" if p.fits_here else "#ffebee" for p in plans]] * 6 + \
           [["#e8f5e9" if p.fits_spark else "#ffebee" for p in plans]] * 3
    fig = go.Figure(go.Table(header=dict(values=list(cols), fill_color="#ddd", align="left"),
                             cells=dict(values=list(cols.values()), fill_color=fill, align="left")))
    fig.update_layout(title=title, height=80 + 32 * len(plans), margin=dict(l=10, r=10, t=50, b=10))
    return _figure(widget, fig)
