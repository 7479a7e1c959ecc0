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

# the roofline's geometry in pixels (fixed, so labels can be placed without a browser)
ROOF_SIZE = dict(width=980, height=540, l=70, r=340, t=70, b=60)
LABEL_FONT = 11                 # px; a digit is about 0.62 em wide
MARKER = 10                     # px, marker diameter
PEAK_FONT = 12                  # px, the "peak ... GFLOP/s" note on the roof
_POSITIONS = ("top center", "bottom center", "middle right", "middle left",
              "top right", "top left", "bottom right", "bottom left")


def label_box(px: float, py: float, text: str, position: str) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) pixels of a point label that plotly draws at `position` around (px, py)."""
    w, h, r = 0.62 * LABEL_FONT * len(text) + 2, LABEL_FONT + 2, MARKER / 2
    vert, horiz = position.split()
    x0 = {"center": px - w / 2, "right": px + r, "left": px - r - w}[horiz]
    y0 = {"middle": py - h / 2, "top": py - r - h, "bottom": py + r}[vert]
    if vert != "middle" and horiz != "center":      # corners sit diagonally off the marker
        x0 += -r / 2 if horiz == "right" else r / 2
    return x0, y0, x0 + w, y0 + h


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _crosses(box, line_y) -> bool:
    """Whether a line y = line_y(x) (pixels) runs through the box."""
    x0, y0, x1, y1 = box
    return any(y0 < line_y(x0 + f * (x1 - x0)) < y1 for f in (0.0, 0.25, 0.5, 0.75, 1.0))


def place_labels(xy_px, texts, line_y=None, keep_clear=()) -> list[str]:
    """A textposition per point so no label covers another label, a marker or a `keep_clear` box,
    nor (if given) the line y = line_y(x) in pixels; greedy, left to right; where every position
    collides, the least-covered one."""
    r = MARKER / 2
    markers = [(x - r, y - r, x + r, y + r) for x, y in xy_px]
    placed, out = list(keep_clear), [""] * len(texts)
    for i in sorted(range(len(texts)), key=lambda i: xy_px[i]):
        x, y = xy_px[i]

        def cost(pos):
            box = label_box(x, y, texts[i], pos)
            hit = sum(_overlap(box, b) for b in placed + markers[:i] + markers[i + 1:])
            return (hit > 0, line_y is not None and _crosses(box, line_y), hit)
        out[i] = min(_POSITIONS, key=cost)          # first free position in _POSITIONS' order
        placed.append(label_box(x, y, texts[i], out[i]))
    return out


def roofline(points, peak_gflops: float, bandwidth_gbs, title: str = "Roofline",
             widget: bool = False, peak_note: str = ""):
    """A log-log roofline: attainable GFLOP/s = min(peak, bandwidth * intensity), plus measured points.

    points: iterable of (name, flops_per_byte, achieved_gflops) or dicts with those keys
            ("name", "intensity", "gflops").
    bandwidth_gbs: one memory bandwidth in GB/s, or {label: GB/s} for several roofs.
    peak_note: how the peak was measured, shown under the title (e.g. "best of 7 GEMM runs").
    Points are numbered on the plot; the key beside it names them and hovering shows the numbers.
    A point above the highest roof is drawn as a triangle and the key says so.
    """
    if peak_gflops <= 0:
        raise ValueError(f"peak_gflops must be > 0, got {peak_gflops}")
    roofs = bandwidth_gbs if isinstance(bandwidth_gbs, dict) else {"memory": bandwidth_gbs}
    for label, bw in roofs.items():
        if bw <= 0:
            raise ValueError(f"bandwidth for {label!r} must be > 0, got {bw}")
    pts = []
    for p in points:
        if isinstance(p, dict):
            pts.append((str(p["name"]), float(p["intensity"]), float(p["gflops"])))
        else:
            name, ai, gf = p
            pts.append((str(name), float(ai), float(gf)))
    peak, top = float(peak_gflops), max(float(b) for b in roofs.values())
    lo = min([0.01] + [ai / 4 for _, ai, _ in pts if ai > 0])
    hi = max([1000.0] + [ai * 4 for _, ai, _ in pts])
    x = np.logspace(math.log10(lo), math.log10(hi), 200)
    ylo = min([float(min(roofs.values())) * lo] + [gf for _, _, gf in pts if gf > 0]) / 2
    xr, yr = (math.log10(lo), math.log10(hi)), (math.log10(ylo), math.log10(peak * 4))
    fig = go.Figure()
    for label, bw in roofs.items():
        fig.add_scatter(x=x, y=np.minimum(peak, float(bw) * x), mode="lines",
                        name=f"{label}: {bw:g} GB/s", line=dict(width=2), hoverinfo="name")
    ridge = peak / top
    peak_text = f"peak {peak:g} GFLOP/s"
    fig.add_annotation(x=math.log10(ridge), y=math.log10(peak), xanchor="left", yanchor="bottom", yshift=2,
                       showarrow=False, text=peak_text, font=dict(size=PEAK_FONT))
    if pts:
        S = ROOF_SIZE
        pw, ph = S["width"] - S["l"] - S["r"], S["height"] - S["t"] - S["b"]
        px = lambda ai: S["l"] + (math.log10(ai) - xr[0]) / (xr[1] - xr[0]) * pw
        py = lambda gf: S["t"] + (yr[1] - math.log10(gf)) / (yr[1] - yr[0]) * ph
        xy = [(px(ai), py(gf)) for _, ai, gf in pts]
        # the top roof in pixels, for the labels to keep off it
        roof_py = lambda x_px: py(min(peak, top * 10 ** (xr[0] + (x_px - S["l"]) / pw * (xr[1] - xr[0]))))
        nums = [str(i + 1) for i in range(len(pts))]
        above = [gf > min(peak, top * ai) * 1.0001 for _, ai, gf in pts]
        hover = [f"{n}. {name}<br>{ai:.3g} FLOP/byte · {gf:.3g} GFLOP/s · {100 * gf / min(peak, top * ai):.0f}% of the roof"
                 for n, (name, ai, gf) in zip(nums, pts)]
        peak_box = (px(ridge), py(peak) - 2 - PEAK_FONT - 4, px(ridge) + 0.62 * PEAK_FONT * len(peak_text), py(peak) - 2)
        fig.add_scatter(x=[p[1] for p in pts], y=[p[2] for p in pts], mode="markers+text", text=nums,
                        textposition=place_labels(xy, nums, roof_py, [peak_box]), textfont=dict(size=LABEL_FONT),
                        hovertext=hover, hoverinfo="text", name="measured",
                        marker=dict(size=MARKER, color="#d62728",
                                    symbol=["triangle-up" if a else "circle" for a in above]))
        key = [f"{n:>2s}  {name}" + ("  ▲ above the roof" if a else "") for n, (name, _, _), a in zip(nums, pts, above)]
        fig.add_annotation(xref="paper", yref="paper", x=1.03, y=1.0, xanchor="left", yanchor="top",
                           align="left", showarrow=False, font=dict(size=11, family="monospace"),
                           text="<br>".join(key))
    if peak_note:
        title = f"{title}<br><sup>{peak_note}</sup>"
    fig.update_layout(title=title, width=ROOF_SIZE["width"], height=ROOF_SIZE["height"],
                      margin=dict(l=ROOF_SIZE["l"], r=ROOF_SIZE["r"], t=ROOF_SIZE["t"], b=ROOF_SIZE["b"]),
                      legend=dict(x=0.01, y=0.99, xanchor="left", yanchor="top", bgcolor="rgba(255,255,255,0.7)"),
                      xaxis=dict(type="log", range=list(xr), title="arithmetic intensity (FLOP / byte)"),
                      yaxis=dict(type="log", range=list(yr), title="GFLOP / s"))
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
