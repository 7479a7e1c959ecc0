"""widgets: the buttons drive the backend and the displays show what the backend returned.

The chat/pipeline/summarizer objects below are test doubles for the UI wiring only (named
Scripted*): they stand in for spark_lab.llm / diffusion / summarize so these tests need no
weights. The memory dashboard is tested against the real allocator.
"""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spark_lab import widgets
from spark_lab.memory import Allocator, TAGS


class ScriptedChatSession:
    """UI test double: streams a fixed reply piece by piece and records what it was asked."""

    def __init__(self, reply=("Hello", ",", " world", "!")):
        self.reply = reply
        self.history = []
        self.calls = []

    def stream(self, msg, **gen):
        self.calls.append((msg, gen))
        self.history.append({"role": "user", "content": msg})
        seen = []
        for p in self.reply:
            seen.append(p)
            yield p
        self.history.append({"role": "assistant", "content": "".join(seen)})


def test_chatbox_send_streams_into_transcript():
    s = ScriptedChatSession()
    box = widgets.ChatBox(s, max_new_tokens=12, temperature=0.0)
    renders = []
    box.transcript.observe(lambda ch: renders.append(ch["new"]), names="value")
    out = box.send("Hi there")
    assert out == "Hello, world!"
    assert s.calls == [("Hi there", {"max_new_tokens": 12, "temperature": 0.0})]
    # the answer grew in the display piece by piece, then settled
    partials = [r for r in renders if "&#9646;" in r]
    assert len(partials) >= len(s.reply)
    assert "Hello," in partials[-2] and "Hello, world!" in partials[-1]
    assert "Hi there" in box.transcript.value and "Hello, world!" in box.transcript.value
    assert "&#9646;" not in box.transcript.value
    assert len(box.last_times) == 4 and box.last_times == sorted(box.last_times)
    assert "4 tokens" in box.status.value and "tok/s" in box.status.value
    assert not box.send_button.disabled


def test_chatbox_button_and_enter_use_the_text_box():
    s = ScriptedChatSession(reply=("ok",))
    box = widgets.ChatBox(s)
    box.text.value = "first question"          # Enter (value synced) sends it
    assert [c[0] for c in s.calls] == ["first question"] and box.text.value == ""
    box.send_button.click()                    # empty box: nothing sent
    assert len(s.calls) == 1
    box.text.value = "  "                      # whitespace only: nothing sent
    assert len(s.calls) == 1
    assert box.transcript.value.count("spark-user") == 1 + 1   # the CSS rule + one message


def test_chatbox_shows_backend_errors_in_the_widget():
    class FailingSession(ScriptedChatSession):
        def stream(self, msg, **gen):
            yield "partial"
            raise ValueError("prompt is longer than the context (5000 > 2048 tokens)")

    box = widgets.ChatBox(FailingSession())
    assert box.send("x" * 10) == "partial"
    assert "ValueError" in box.status.value and "2048" in box.status.value
    assert not box.busy and not box.send_button.disabled


def test_chatbox_rejects_what_it_cannot_chat_with():
    with pytest.raises(ValueError, match="LLM or a ChatSession"):
        widgets.ChatBox(object())
    with pytest.raises(ValueError, match="empty"):
        widgets.ChatBox(ScriptedChatSession()).send("  ")


class ScriptedPipeline:
    """UI test double: calls the step callback like diffusers' (step, timestep, latents), returns a PIL image."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, num_inference_steps=25, seed=0, callback=None, **kw):
        self.calls.append((prompt, num_inference_steps, seed, kw))
        rng = np.random.default_rng(seed)
        lat = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
        for i in range(num_inference_steps):
            if callback is not None:
                callback(i, 999 - i, lat)
        return [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))]


def test_image_gallery_previews_each_step_and_collects_images():
    pipe = ScriptedPipeline()
    g = widgets.ImageGallery(pipe, num_inference_steps=3, seed=7, guidance_scale=2.0)
    g.prompt.value = "a smiling sun"
    g.button.click()
    assert pipe.calls == [("a smiling sun", 3, 7, {"guidance_scale": 2.0})]
    assert g.previews == 3 and g.preview.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(g.gallery.children) == 1 and len(g.images) == 1
    g.seed.value = 8
    img = g.generate("a cat")
    assert pipe.calls[-1][:3] == ("a cat", 3, 8) and len(g.gallery.children) == 2
    assert img.size == (16, 16)
    with pytest.raises(ValueError, match="prompt is empty"):
        g.generate("")


FIXTURES = Path(__file__).parent / "fixtures" / "diffusion"


def test_image_gallery_drives_the_real_pipeline():
    """The gallery on spark_lab's own pipeline (tiny SD-style model): same image as calling it directly."""
    diffusion = pytest.importorskip("spark_lab.diffusion")
    if not (FIXTURES / "tiny-sd").is_dir():
        pytest.skip("tests/fixtures/diffusion/tiny-sd is missing")
    pipe = diffusion.TextToImagePipeline.from_pretrained(FIXTURES / "tiny-sd")
    ref = pipe("a red heart", num_inference_steps=3, seed=5, progress=False)[0]
    for decode in (False, True):                   # a cheap latent view, or exact previews through the VAE
        g = widgets.ImageGallery(pipe, num_inference_steps=3, seed=5, decode_previews=decode)
        img = g.generate("a red heart")
        np.testing.assert_array_equal(np.asarray(img), np.asarray(ref))
        assert g.previews == 3
        preview = Image.open(io.BytesIO(g.preview.value))
        assert preview.size == (g.preview_size, g.preview_size)
    assert not widgets.ImageGallery(pipe).decode_previews     # latent model: no VAE pass per step by default


def test_latents_preview_scales_to_full_range():
    lat = np.stack([np.full((4, 4), c, np.float32) for c in range(4)])[None]
    lat[0, :, 0, 0] = -3.0
    img = widgets.latents_preview(lat, size=16)
    a = np.asarray(img)
    assert img.size == (16, 16) and a.min() == 0 and a.max() == 255


def test_summarizer_panel_calls_the_summarizer_with_its_settings():
    calls = []

    def scripted_summarize(text, method, max_words, llm, encoder):   # UI test double
        calls.append((text, method, max_words, llm, encoder))
        return type("Summary", (), {"text": "Short <b>summary</b>."})()

    p = widgets.SummarizerPanel(llm="LLM", encoder="ENC", summarize_fn=scripted_summarize)
    p.text.value = "One. Two. Three."
    p.method.value = "hybrid"
    p.max_words.value = 40
    p.button.click()
    assert calls == [("One. Two. Three.", "hybrid", 40, "LLM", "ENC")]
    assert "Short &lt;b&gt;summary&lt;/b&gt;." in p.output.value        # escaped, not injected
    p._on_upload({"new": ({"name": "a.txt", "content": memoryview("Uploaded text.".encode())},)})
    assert p.text.value == "Uploaded text." and "a.txt" in p.status.value
    with pytest.raises(ValueError, match="method"):
        widgets.SummarizerPanel(method="magic")


def test_memory_dashboard_figure_equals_allocator_stats():
    alloc = Allocator(budget=256 << 20)
    dash = widgets.MemoryDashboard(alloc)
    st0 = dash.refresh()
    w = alloc.empty((512, 512), tag="weights")         # 1 MiB
    kv = alloc.zeros((4, 1024, 32), tag="kv_cache")    # 512 KiB
    st1 = dash.refresh()
    assert st1.by_tag["weights"] - st0.by_tag["weights"] == w.nbytes
    traces = {d.name: d for d in dash.figure.data}
    for tag in TAGS:
        assert list(traces[tag].y) == [st0.by_tag[tag], st1.by_tag[tag]]
    assert list(traces["in use"].y) == [st0.in_use, st1.in_use]
    assert len(traces["in use"].x) == 2 and traces["in use"].x[1] >= traces["in use"].x[0]
    del kv
    st2 = dash.refresh()
    assert traces["kv_cache"].y[-1] == st2.by_tag["kv_cache"] == st0.by_tag["kv_cache"]
    assert "weights 1.0 MiB" in dash.summary.value


def test_memory_dashboard_shows_a_tracker_series_and_new_tags():
    alloc = Allocator(budget=64 << 20)
    dash = widgets.MemoryDashboard(alloc)
    with alloc.track() as t:
        a = alloc.empty(1000, tag="activations")
        b = alloc.empty(10, tag="my_lora")             # a tag the kit does not know in advance
    dash.show_series(t.series)
    traces = {d.name: d for d in dash.figure.data}
    assert list(traces["in use"].y) == [s[1] for s in t.series]
    dash.refresh()
    names = [d.name for d in dash.figure.data]
    assert "my_lora" in names and names[-1] == "in use"
    assert dash.figure.data[names.index("my_lora")].y[-1] == b.nbytes
    del a


def test_memory_dashboard_background_thread_samples_and_stops():
    alloc = Allocator(budget=64 << 20)
    dash = widgets.MemoryDashboard(alloc)
    dash.start(interval=0.01)
    assert dash.running
    import time
    deadline = time.time() + 5
    while len(dash.samples) < 3 and time.time() < deadline:
        time.sleep(0.01)
    dash.stop()
    assert not dash.running and len(dash.samples) >= 3
    n = len(dash.samples)
    time.sleep(0.05)
    assert len(dash.samples) == n
    with pytest.raises(ValueError):
        dash.start(interval=0)


def test_stream_timer_records_one_time_per_piece():
    t = widgets.StreamTimer(iter(["a", "b", "c"]))
    assert "".join(t) == "abc" and t.text == "abc"
    assert len(t.times) == 3 and t.times == sorted(t.times)


@pytest.mark.slow
def test_chatbox_on_the_real_llm_matches_a_chat_session():
    """ChatBox(LLM) builds a ChatSession: at temperature 0 it shows exactly what the session answers."""
    llm_mod = pytest.importorskip("spark_lab.llm")
    from spark_lab.models import ModelNotFound
    try:
        llm = llm_mod.LLM.load("smollm2-135m-instruct", n_ctx=256)
    except ModelNotFound as e:
        pytest.skip(str(e))
    gen = dict(max_new_tokens=2, temperature=0.0)
    box = widgets.ChatBox(llm, system_prompt="You are terse.", **gen)
    shown = box.send("Capital of France?")
    expected = llm_mod.ChatSession(llm, system_prompt="You are terse.").send("Capital of France?", **gen)
    assert shown == expected and shown
    assert len(box.last_times) >= 1 and "tok/s" in box.status.value
    assert [m["role"] for m in box.session.history][-2:] == ["user", "assistant"]


def _front_end_breakers(made):
    """Widgets whose ipywidgets 8 view cannot render: the front end's DOMWidgetView.updateTooltip
    runs `model.get("description").length` whenever a tooltip is set, so a tooltip on a widget
    without a description (Image, Box, ...) throws "reading 'length'" and the view fails."""
    return [f"{type(w).__name__}(tooltip={w.tooltip!r})" for w in made
            if getattr(w, "tooltip", None) and not w.has_trait("description")]


def test_every_front_end_widget_can_render_in_jupyterlab():
    from ipywidgets.widgets.widget import _instances
    before = set(_instances)
    g = widgets.ImageGallery(ScriptedPipeline(), num_inference_steps=2)
    g.generate("a cat")
    c = widgets.ChatBox(ScriptedChatSession())
    c.send("Hi")
    widgets.SummarizerPanel(summarize_fn=lambda text, **kw: text[:5], text="some words here").summarize()
    widgets.MemoryDashboard(Allocator(budget=1 << 20)).refresh()
    made = [w for k, w in _instances.items() if k not in before]
    assert len(made) > 20
    assert _front_end_breakers(made) == []
    # the rule itself: it flags the Image-with-tooltip that broke the gallery's thumbnails
    import ipywidgets
    assert _front_end_breakers([ipywidgets.Image(tooltip="x"), ipywidgets.Button(tooltip="ok")]) == \
        ["Image(tooltip='x')"]
    # the thumbnail's caption says what it shows
    assert "a cat (seed 0)" in g.gallery.children[0].children[1].value
