"""ipywidgets front ends: a streaming chat box, an image gallery, a summarizer panel, a memory dashboard.

Each is an `ipywidgets.VBox` (display it, or put it in a layout) with a plain Python method
that does what its button does (`ChatBox.send`, `ImageGallery.generate`,
`SummarizerPanel.summarize`, `MemoryDashboard.refresh`), so the wiring can be driven and
tested without a browser. Widget values set inside a callback reach the browser at once,
which is how the chat answer streams in while the kernel is busy generating it.
"""
from __future__ import annotations

import html
import inspect
import io
import threading
import time

import ipywidgets as widgets
import numpy as np

from . import plots
from .memory import TAGS, fmt_bytes, get_allocator


class StreamTimer:
    """Wraps an iterator of text pieces and records when each arrived (seconds since start).

        timer = StreamTimer(llm.stream("Hi"))
        text = "".join(timer)
        plots.generation_speed(timer.times, prompt_tokens=...)
    """

    def __init__(self, pieces):
        self._pieces = iter(pieces)
        self.times: list[float] = []     # [n] arrival time of each piece
        self.pieces: list[str] = []      # [n] the pieces themselves
        self.t0 = time.perf_counter()

    def __iter__(self):
        for p in self._pieces:
            self.times.append(time.perf_counter() - self.t0)
            self.pieces.append(p)
            yield p

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def _error_html(e: Exception) -> str:
    return f'<span style="color:#c62828">{html.escape(type(e).__name__)}: {html.escape(str(e))}</span>'


# ----------------------------------------------------------------------------- chat

_CHAT_CSS = ("<style>.spark-msg{white-space:pre-wrap;padding:6px 10px;margin:4px 0;border-radius:8px;"
             "font-family:var(--jp-content-font-family, sans-serif);line-height:1.4}"
             ".spark-user{background:#e3f2fd;margin-left:15%}"
             ".spark-assistant{background:#f5f5f5;margin-right:15%}"
             ".spark-reasoning{color:#777;font-size:90%;margin-top:4px}"
             ".spark-tool{background:#fff8e1;margin-right:15%;font-family:monospace;font-size:90%}</style>")


class ToolEvent(tuple):
    """(name, arguments JSON, result) of one tool call the ChatBox ran."""


def _tools_html(events) -> str:
    return "".join(f'<div class="spark-msg spark-tool">&#128295; {html.escape(n)}({html.escape(a)})'
                   f' &rarr; {html.escape(str(r))}</div>' for n, a, r in events)


def _reasoning_html(reasoning: str, open_: bool = False) -> str:
    """A reasoning model's thinking as a collapsed section under its answer (open while it streams)."""
    if not reasoning:
        return ""
    return (f'<details class="spark-reasoning"{" open" if open_ else ""}><summary>reasoning</summary>'
            f'{html.escape(reasoning)}</details>')


def _as_session(llm_or_session, system_prompt, tools=None):
    """A ChatSession for an LLM; anything with `.stream(msg)` and `.history` is used as it is."""
    if hasattr(llm_or_session, "stream") and hasattr(llm_or_session, "history"):
        if system_prompt is not None:
            raise ValueError("ChatBox: pass system_prompt to the ChatSession, not to ChatBox, when giving a session")
        if tools:
            llm_or_session.tools = list(tools)
        return llm_or_session
    if hasattr(llm_or_session, "chat_stream"):
        from .llm import ChatSession
        return ChatSession(llm_or_session, system_prompt=system_prompt, tools=tools)
    raise ValueError(f"ChatBox needs an LLM or a ChatSession, got {type(llm_or_session).__name__}")


class ChatBox(widgets.VBox):
    """A chat: transcript, a text box, a Send button; the answer streams in with its speed.

        ChatBox(LLM.load("smollm2-135m-instruct"), system_prompt="You are terse.", max_new_tokens=64)

    With `tools` (OpenAI format) and `functions` ({name: Python callable}) the model may call them: each
    call runs here, shows as a line with its result, goes back to the model, until it answers in text
    (or `max_tool_rounds`). gen may hold tool_choice= for the first round ("required", a name).
    """

    def __init__(self, llm_or_session, system_prompt: str | None = None, max_new_tokens: int = 256,
                 placeholder: str = "Ask something, then press Enter or Send", tools: list[dict] | None = None,
                 functions: dict | None = None, max_tool_rounds: int = 4, **gen):
        self.session = _as_session(llm_or_session, system_prompt, tools)
        self.functions = dict(functions or {})
        self.max_tool_rounds = max_tool_rounds
        self.tool_events: list[list[ToolEvent]] = []            # each turn's tool calls and results
        self.gen = dict(max_new_tokens=max_new_tokens, **gen)   # generate() arguments for every turn
        self.turns: list[tuple[str, str]] = []                  # (user, assistant) shown so far
        self.reasoning: list[str] = []                          # each turn's thinking ("" for most models)
        self.last_times: list[float] = []                       # piece arrival times of the last answer
        self.busy = False
        self.transcript = widgets.HTML(_CHAT_CSS, layout=widgets.Layout(width="100%"))
        self.transcript.add_class("spark-chat-transcript")
        self.text = widgets.Text(placeholder=placeholder, continuous_update=False,
                                 layout=widgets.Layout(flex="1 1 auto", width="auto"))
        self.text.add_class("spark-chat-input")
        self.send_button = widgets.Button(description="Send", button_style="primary", icon="paper-plane")
        self.send_button.add_class("spark-chat-send")
        self.status = widgets.HTML()
        self.status.add_class("spark-chat-status")
        # Enter (continuous_update=False syncs the value on Enter or when the box loses focus) or Send
        self.text.observe(lambda change: self._submit(), names="value")
        self.send_button.on_click(lambda _b: self._submit())
        super().__init__([self.transcript, widgets.HBox([self.text, self.send_button]), self.status],
                         layout=widgets.Layout(width="100%", max_width="900px"))

    def _submit(self):
        msg = self.text.value.strip()
        if msg and not self.busy:
            self.text.value = ""
            self.send(msg)

    def _render(self, pending_user: str | None = None, partial: str = "", thinking: str = ""):
        parts = [_CHAT_CSS]
        for k, ((user, answer), reasoning) in enumerate(zip(self.turns, self.reasoning)):
            parts.append(f'<div class="spark-msg spark-user">{html.escape(user)}</div>')
            parts.append(_tools_html(self.tool_events[k] if k < len(self.tool_events) else []))
            parts.append(f'<div class="spark-msg spark-assistant">{html.escape(answer)}{_reasoning_html(reasoning)}</div>')
        if pending_user is not None:
            parts.append(f'<div class="spark-msg spark-user">{html.escape(pending_user)}</div>')
            parts.append(_tools_html(self._pending_tools))
            parts.append(f'<div class="spark-msg spark-assistant">{html.escape(partial)}&#9646;'
                         f'{_reasoning_html(thinking, open_=not partial)}</div>')
        self.transcript.value = "".join(parts)

    def _count_tokens(self, text: str, pieces: int) -> int:
        llm = getattr(self.session, "llm", None)
        if llm is not None and hasattr(llm, "count_tokens"):
            try:
                return int(llm.count_tokens(text))
            except Exception:
                pass
        return pieces  # the engine streams about one piece per token

    def send(self, msg: str) -> str:
        """Send one user message, stream the answer into the transcript, return the answer."""
        if not msg or not msg.strip():
            raise ValueError("ChatBox.send: the message is empty")
        self.busy = True
        self.send_button.disabled = True
        self.status.value = "<i>thinking…</i>"
        from .llm.reasoning import ReasoningPiece
        answer = thinking = ""
        self._pending_tools = []
        timer = StreamTimer(self._rounds(msg))
        self._render(msg)
        try:
            for piece in timer:
                if isinstance(piece, ToolEvent):
                    self._pending_tools.append(piece)
                    answer = ""                    # the call's text is shown as the tool line instead
                elif isinstance(piece, ReasoningPiece):
                    thinking += piece
                else:
                    answer += piece
                self._render(msg, answer, thinking)
        except Exception as e:  # shown in the widget: an exception in a callback is otherwise invisible
            self.status.value = _error_html(e)
            self.turns.append((msg, answer))
            self.reasoning.append(thinking)
            self.tool_events.append(self._pending_tools)
            self._render()
            return answer
        finally:
            self.busy = False
            self.send_button.disabled = False
        self.turns.append((msg, answer))
        self.reasoning.append(thinking)
        self.tool_events.append(self._pending_tools)
        self._render()
        self.last_times = timer.times
        n = self._count_tokens(thinking + answer, len(timer.times))
        if timer.times:
            first, total = timer.times[0], timer.times[-1]
            rate = (len(timer.times) - 1) / (total - first) if total > first else 0.0
            self.status.value = (f"{n} tokens in {total:.2f} s · <b>{rate:.1f} tok/s</b> decode · "
                                 f"first token after {first:.2f} s")
        else:
            self.status.value = "no tokens"
        return answer


    def _rounds(self, msg: str):
        """The answer's pieces; with functions, each tool call run (a ToolEvent) and the model asked again."""
        import json
        _pending = self.session.stream(msg, **self.gen)
        gen = {k: v for k, v in self.gen.items() if k != "tool_choice"}
        for _ in range(self.max_tool_rounds + 1):
            yield from _pending
            calls = getattr(self.session, "last_tool_calls", []) if self.functions else []
            if not calls:
                return
            for call in calls:
                name, args = call["function"]["name"], call["function"]["arguments"]
                fn = self.functions.get(name)
                try:
                    result = fn(**json.loads(args)) if fn is not None else f"error: no function {name!r}"
                except Exception as e:      # the model sees the error and may try again
                    result = f"error: {type(e).__name__}: {e}"
                self.session.add_tool_result(call, result)
                yield ToolEvent((name, args, result))
            _pending = self.session.stream(None, **gen)


# ----------------------------------------------------------------------------- images

def latents_preview(latents, size: int = 128):
    """A quick look at an intermediate sample: first image, first 3 channels, min-max scaled -> PIL."""
    from PIL import Image
    from .device import to_host
    a = np.asarray(to_host(latents), dtype=np.float32)
    if a.ndim == 4:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"latents must be [N, C, H, W] or [C, H, W], got shape {a.shape}")
    a = a[:3] if a.shape[0] >= 3 else np.repeat(a[:1], 3, axis=0)
    lo, hi = a.min(axis=(1, 2), keepdims=True), a.max(axis=(1, 2), keepdims=True)
    a = (a - lo) / np.maximum(hi - lo, 1e-6)
    img = Image.fromarray((a.transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8))
    scale = max(1, size // max(img.size))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _find_latents(args, kwargs):
    """The array in a step callback's arguments: diffusers' legacy (step, timestep, latents) or latents=."""
    if "latents" in kwargs:
        return kwargs["latents"]
    for a in reversed(args):
        if hasattr(a, "shape") and getattr(a, "ndim", 0) >= 3:
            return a
    return None


class ImageGallery(widgets.VBox):
    """Prompt, steps and seed in; a live preview of each denoising step; finished images collect below.

    The gallery is the hub of the image tools: each tile has a "use as init" button (or upload a
    picture with "add image"), and the image-to-image and inpainting panels of widgets_images made
    with `gallery=` start from the chosen tile and add their results here as new tiles."""

    def __init__(self, pipe, num_inference_steps: int = 25, seed: int = 0, guidance_scale: float | None = None,
                 prompt: str = "", preview_size: int = 192, thumb_size: int = 128,
                 decode_previews: bool | None = None):
        self.pipe = pipe
        self.guidance_scale = guidance_scale
        # previews through pipe.decode are exact but cost a VAE pass per step; pixel-space models
        # (no VAE) get them for free, latent models get a cheap channel view unless asked
        if decode_previews is None:
            decode_previews = hasattr(pipe, "decode") and getattr(pipe, "vae", None) is None
        self.decode_previews = decode_previews
        try:
            self._quiet = "progress" in inspect.signature(pipe.__call__).parameters
        except (TypeError, ValueError):
            self._quiet = False
        self.preview_size, self.thumb_size = preview_size, thumb_size
        self.images: list = []          # PIL images made so far, one per tile
        self.captions: list = []        # [n] each tile's caption
        self.selected: int | None = None   # the tile chosen as init image
        self._listeners: list = []      # fn(image) called when a tile is chosen
        self.previews = 0               # step previews shown during the last generate()
        self.prompt = widgets.Text(value=prompt, placeholder="a prompt", layout=widgets.Layout(width="60%"))
        self.steps = widgets.IntSlider(value=num_inference_steps, min=1, max=100, description="steps")
        self.seed = widgets.IntText(value=seed, description="seed", layout=widgets.Layout(width="160px"))
        self.button = widgets.Button(description="Generate", button_style="primary", icon="image")
        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="add image")
        self.preview = widgets.Image(format="png", width=preview_size, height=preview_size)
        self.gallery = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.status = widgets.HTML()
        self.selection = widgets.HTML("init image: none chosen (press <i>use as init</i> under a tile)")
        self.button.on_click(lambda _b: self.generate())
        self.upload.observe(self._on_upload, names="value")
        super().__init__([widgets.HBox([self.prompt, self.button]), widgets.HBox([self.steps, self.seed]),
                          self.preview, self.status, widgets.HBox([self.upload, self.selection]), self.gallery])

    def _on_step(self, *args, **kwargs):
        lat = _find_latents(args, kwargs)
        if lat is None:
            return
        self.previews += 1
        if self.decode_previews:
            from PIL import Image
            img = Image.fromarray(plots.to_uint8_image(self.pipe.decode(lat)[0]))
            img = img.resize((self.preview_size, self.preview_size), Image.NEAREST)
        else:
            img = latents_preview(lat, self.preview_size)
        self.preview.value = _png(img)
        self.status.value = f"step {self.previews} / {self.steps.value}"

    def generate(self, prompt: str | None = None):
        """Run the pipeline once with the widget's settings; returns the PIL image."""
        prompt = self.prompt.value if prompt is None else prompt
        if not prompt.strip():
            raise ValueError("ImageGallery.generate: the prompt is empty")
        self.prompt.value = prompt
        self.previews = 0
        self.button.disabled = True
        kw = dict(num_inference_steps=int(self.steps.value), seed=int(self.seed.value), callback=self._on_step)
        if self.guidance_scale is not None:
            kw["guidance_scale"] = self.guidance_scale
        if self._quiet:
            kw["progress"] = False      # the preview is the progress bar
        t0 = time.perf_counter()
        try:
            images = self.pipe(prompt, **kw)
        except Exception as e:
            self.status.value = _error_html(e)
            raise
        finally:
            self.button.disabled = False
        dt = time.perf_counter() - t0
        img = images[0]
        self.preview.value = _png(img.resize((self.preview_size, self.preview_size)))
        self.add(img, prompt, seed=kw["seed"])
        self.status.value = f"{kw['num_inference_steps']} steps in {dt:.1f} s ({dt / kw['num_inference_steps']:.2f} s/step)"
        return img

    # the tiles
    def add(self, img, prompt: str, **settings) -> int:
        """A new tile: the image over 'prompt (seed 3, strength 0.85, ...)' (settings that are None are
        left out, a loaded LoRA is named with its scale) and a "use as init" button; returns its index."""
        notes = [f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in settings.items() if v is not None]
        notes += [f"LoRA {a.name.removesuffix('.safetensors')} {a.scale:.2f}"
                  for a in getattr(self.pipe, "adapters", None) or []]
        text = f"{prompt} ({', '.join(notes)})" if notes else prompt
        i = len(self.images)
        self.images.append(img)
        self.captions.append(text)
        # the caption is an HTML line, not Image(tooltip=...): ipywidgets 8's front end reads
        # model.description.length when a tooltip is set, and Image has no description, so the
        # view fails to render ("Failed to create view for 'ImageView'")
        label = html.escape(text)
        caption = widgets.HTML(f'<div title="{label}" style="width:{self.thumb_size}px;font-size:11px;'
                               f'overflow:hidden;text-overflow:ellipsis;white-space:nowrap">{label}</div>')
        use = widgets.Button(description="use as init", layout=widgets.Layout(width=f"{self.thumb_size}px"))
        use.on_click(lambda _b: self.select(i))
        thumb = widgets.VBox([widgets.Image(value=_png(img), format="png", width=self.thumb_size,
                                            height=self.thumb_size), caption, use],
                             layout=widgets.Layout(border="2px solid transparent", padding="2px"))
        self.gallery.children = tuple(self.gallery.children) + (thumb,)
        return i

    def select(self, index: int):
        """Tile `index` becomes the init image: outlined here, passed to every `on_select` listener."""
        if not -len(self.images) <= index < len(self.images):
            raise ValueError(f"no tile {index}: the gallery has {len(self.images)}")
        self.selected = index % len(self.images)
        for k, tile in enumerate(self.gallery.children):
            tile.layout.border = "2px solid #1e88e5" if k == self.selected else "2px solid transparent"
        self.selection.value = f"init image: tile {self.selected} ({html.escape(self.captions[self.selected])})"
        for fn in self._listeners:
            fn(self.images[self.selected])

    @property
    def init_image(self):
        """The chosen tile's PIL image (the newest tile while none is chosen; None when empty)."""
        if self.selected is not None:
            return self.images[self.selected]
        return self.images[-1] if self.images else None

    def on_select(self, fn):
        """Call fn(image) whenever a tile is chosen as init image."""
        self._listeners.append(fn)

    def _on_upload(self, change):
        files = change["new"]
        if files:
            from PIL import Image
            f = files[-1]      # ipywidgets 8: a tuple of {"name", "content": memoryview, ...}
            img = Image.open(io.BytesIO(bytes(f["content"]))).convert("RGB")
            self.select(self.add(img, f"upload: {f['name']}"))


# ----------------------------------------------------------------------------- summaries

class SummarizerPanel(widgets.VBox):
    """Paste text or upload a file, pick a method, read the summary.

    `summarize_fn` defaults to `spark_lab.summarize.summarize` (called with llm= and encoder=).
    """

    METHODS = ("extractive", "abstractive", "hybrid")

    def __init__(self, llm=None, encoder=None, method: str = "extractive", max_words: int = 150,
                 summarize_fn=None, text: str = ""):
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {', '.join(self.METHODS)}, got {method!r}")
        self.llm, self.encoder = llm, encoder
        self._summarize_fn = summarize_fn
        self.result = None              # the last Summary
        self.text = widgets.Textarea(value=text, placeholder="Paste a text to summarize, or upload a file",
                                     layout=widgets.Layout(width="100%", height="160px"))
        self.upload = widgets.FileUpload(accept=".txt,.md", multiple=False, description="Upload")
        self.method = widgets.Dropdown(options=self.METHODS, value=method, description="method")
        self.max_words = widgets.IntSlider(value=max_words, min=20, max=500, step=10, description="max words")
        self.button = widgets.Button(description="Summarize", button_style="primary", icon="compress")
        self.output = widgets.HTML()
        self.status = widgets.HTML()
        self.upload.observe(self._on_upload, names="value")
        self.button.on_click(lambda _b: self.summarize())
        super().__init__([self.text, widgets.HBox([self.upload, self.method, self.max_words, self.button]),
                          self.status, self.output], layout=widgets.Layout(width="100%", max_width="900px"))

    def _on_upload(self, change):
        files = change["new"]
        if files:
            f = files[0]  # ipywidgets 8: a tuple of {"name", "content": memoryview, ...}
            self.text.value = bytes(f["content"]).decode("utf-8", errors="replace")
            self.status.value = f"loaded {html.escape(f['name'])} ({len(self.text.value.split())} words)"

    def summarize(self, text: str | None = None):
        text = self.text.value if text is None else text
        if not text.strip():
            raise ValueError("SummarizerPanel.summarize: there is no text to summarize")
        fn = self._summarize_fn
        if fn is None:
            from .summarize import summarize as fn
        self.button.disabled = True
        self.status.value = f"<i>summarizing {len(text.split())} words ({self.method.value})…</i>"
        t0 = time.perf_counter()
        try:
            self.result = fn(text, method=self.method.value, max_words=int(self.max_words.value),
                             llm=self.llm, encoder=self.encoder)
        except Exception as e:
            self.status.value = _error_html(e)
            raise
        finally:
            self.button.disabled = False
        out = getattr(self.result, "text", self.result)
        self.output.value = f'<div style="white-space:pre-wrap">{html.escape(str(out))}</div>'
        self.status.value = (f"{len(text.split())} words -> {len(str(out).split())} words "
                             f"({self.method.value}, {time.perf_counter() - t0:.1f} s)")
        return self.result


# ----------------------------------------------------------------------------- memory

class MemoryDashboard(widgets.VBox):
    """The allocator's bytes in use over time, stacked by tag, in a plotly FigureWidget.

    `refresh()` takes one sample of `allocator.stats()`; `start(interval)` samples from a
    background thread until `stop()`; `show_series(tracker.series)` plots what a
    `with allocator.track() as t:` block recorded.
    """

    def __init__(self, allocator=None, history: int = 600, title: str = "Memory in use"):
        self.allocator = allocator if allocator is not None else get_allocator()
        self.history = history                      # samples kept
        self.samples: list[tuple[float, int, dict]] = []   # [(seconds, in_use, {tag: bytes})]
        self.t0 = time.perf_counter()
        self.tags = list(TAGS)
        self.figure = plots.memory_timeline([], tags=self.tags, title=title, widget=True)
        self.summary = widgets.HTML()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        super().__init__([self.figure, self.summary])

    def _draw(self):
        x = [s[0] for s in self.samples]
        with self.figure.batch_update():
            for trace, tag in zip(self.figure.data, self.tags):
                trace.x, trace.y = x, [int(s[2].get(tag, 0)) for s in self.samples]
            self.figure.data[len(self.tags)].x = x
            self.figure.data[len(self.tags)].y = [int(s[1]) for s in self.samples]

    def refresh(self):
        """Sample the allocator now, redraw, and return its `MemoryStats`."""
        st = self.allocator.stats()
        with self._lock:
            for tag in st.by_tag:
                if tag not in self.tags:
                    self.tags.append(tag)
                    self.figure.add_scatter(x=[], y=[], name=tag, mode="lines", stackgroup="memory")
                    # keep the "in use" line last
                    d = list(self.figure.data)
                    d.insert(len(self.tags) - 1, d.pop())
                    self.figure.data = d
            self.samples.append((time.perf_counter() - self.t0, int(st.in_use), dict(st.by_tag)))
            self.samples = self.samples[-self.history:]
            self._draw()
        self.summary.value = (f"{html.escape(st.summary())} · peak {fmt_bytes(st.peak)} · "
                              f"capacity {fmt_bytes(st.capacity)}")
        return st

    def show_series(self, series):
        """Replace the samples with a `Tracker.series` [(seconds, in_use, {tag: bytes})]."""
        with self._lock:
            self.samples = [(float(t), int(u), dict(tags)) for t, u, tags in series][-self.history:]
            self._draw()

    def start(self, interval: float = 1.0):
        """Refresh every `interval` seconds from a daemon thread (the kernel stays free)."""
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.stop()
        self._stop.clear()

        def loop():
            while not self._stop.wait(interval):
                self.refresh()

        self.refresh()
        self._thread = threading.Thread(target=loop, name="spark-lab-memory-dashboard", daemon=True)
        self._thread.start()

    def stop(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self):
        self.stop()
        super().close()
