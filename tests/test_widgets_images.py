"""widgets_images: the image-to-image, inpainting and LoRA-scale panels drive the real pipeline (the tiny
pixel-space model) and give exactly what calling it directly gives; the mask painter's brush, mouse,
buttons and upload set the mask they should."""
import io
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spark_lab import widgets_images as wi
from spark_lab.diffusion.pipeline import TextToImagePipeline

FIX = Path(__file__).resolve().parent / "fixtures" / "diffusion"


class HashEncoder:
    """A stand-in for the MiniLM sentence encoder: one fixed random unit vector per text."""

    def encode(self, texts):
        out = []
        for t in texts:
            v = np.random.default_rng(zlib.crc32(t.encode())).standard_normal(384).astype(np.float32)
            out.append(v / np.linalg.norm(v))
        return np.stack(out)


@pytest.fixture
def pipe():
    p = TextToImagePipeline.from_pretrained(FIX / "tiny-pixel")          # 8x8 pixels, DDPM
    p._sentence_encoder = HashEncoder()
    return p


def picture(w=8, h=8, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_strength_plan_counts_the_steps_strength_keeps(pipe):
    plan = wi.strength_plan(pipe, 10, 0.55)
    sched = pipe.scheduler
    assert plan["steps"] == 5 and plan["of"] == 10 and plan["start"] == int(sched.timesteps[5])
    abar = float(sched.alphas_cumprod[plan["start"]])
    assert plan["noise"] == pytest.approx(np.sqrt(1.0 - abar), rel=1e-6)
    assert plan["image"] == pytest.approx(np.sqrt(abar), rel=1e-6)
    assert wi.describe_plan(plan) == (f"strength 0.55: the last 5 of 10 steps, from t = {plan['start']} "
                                      f"(x_t = {np.sqrt(abar):.2f} image + {np.sqrt(1 - abar):.2f} noise)")
    full = wi.strength_plan(pipe, 10, 1.0)
    assert full["steps"] == 10 and full["noise"] > plan["noise"]
    with pytest.raises(ValueError, match="leaves no step to run"):
        wi.strength_plan(pipe, 10, 0.05)


def test_fit_image_crops_the_centre_square_and_scales():
    wide = Image.new("RGB", (30, 10), "red")
    wide.paste(Image.new("RGB", (10, 10), "blue"), (10, 0))             # the centre square is blue
    out = wi.fit_image(png_bytes(wide), 5)
    assert out.size == (5, 5) and out.mode == "RGB"
    assert np.asarray(out)[..., 2].min() > 200 and np.asarray(out)[..., 0].max() < 60
    a = np.zeros((4, 4), np.float32)                                       # arrays: grayscale in [0, 1] too
    assert wi.fit_image(a, 4).size == (4, 4)


def test_image_to_image_panel_is_the_pipeline_call(pipe):
    init = picture()
    p = wi.ImageToImagePanel(pipe, init, prompt="a cat", strength=0.6, num_inference_steps=5, seed=2)
    p.button.click()
    want = pipe("a cat", image=init, strength=0.6, num_inference_steps=5, seed=2, progress=False)[0]
    assert p.result.tobytes() == want.tobytes()
    assert "the last 3 of 5 steps" in p.status.value and p.result_view.value[:4] == b"\x89PNG"
    p.keep.click()                                                          # the result becomes the init image
    assert p.image.tobytes() == want.tobytes()
    p._on_upload({"new": ({"name": "big.png", "content": memoryview(png_bytes(picture(24, 16, seed=3)))},)})
    assert p.image.size == (8, 8)                                           # cropped and scaled to the model's size
    p.strength.value = 0.05
    with pytest.raises(ValueError, match="leaves no step to run"):
        p.run()
    assert "leaves no step to run" in p.status.value


def test_mask_painter_brush_mouse_buttons_and_upload():
    pytest.importorskip("ipycanvas")
    m = wi.MaskPainter(picture(), zoom=4, brush=3)
    m.paint(4, 4)                                                          # a 3x3 square centred on (4, 4)
    assert m.mask.sum() == 9 and m.mask[3:6, 3:6].all() and "9 of 64 pixels" in m.count.value
    m.clear_button.click()
    assert not m.mask.any()
    m.brush.value = 1
    m._down(0, 0)                                                          # screen pixels: zoom 4
    m._move(13, 1)
    m._up(13, 1)
    m._move(28, 28)                                                        # no button held: no paint
    assert m.mask.sum() == 2 and m.mask[0, 0] and m.mask[0, 3]
    m.mode.value = "erase"
    m._down(0, 0)
    m._up(0, 0)
    assert m.mask.sum() == 1
    m.invert_button.click()
    assert m.mask.sum() == 63
    white_left = Image.new("L", (16, 16), 0)
    white_left.paste(255, (0, 0, 8, 16))
    m._on_upload({"new": ({"name": "m.png", "content": memoryview(png_bytes(white_left))},)})
    assert m.mask[:, :4].all() and not m.mask[:, 4:].any()                 # resized to 8x8: the left half
    mask = np.asarray(m.mask_image())
    assert m.mask_image().mode == "L" and set(np.unique(mask)) == {0, 255} and (mask[:, :4] == 255).all()
    m.paint_rect(-5, -5, 100, 2)                                           # clipped to the image
    assert m.mask[:2].all()
    with pytest.raises(ValueError, match="mask is 3x3 but the image is 8x8"):
        m.set_mask(np.zeros((3, 3)))


def test_inpaint_panel_keeps_the_outside_exactly(pipe):
    pytest.importorskip("ipycanvas")
    init = picture(seed=5)
    p = wi.InpaintPanel(pipe, init, prompt="a dog", num_inference_steps=4, seed=1)
    with pytest.raises(ValueError, match="nothing repainted yet"):
        p.outside_change()
    p.painter.paint_rect(4, 0, 8, 8)                                       # the right half
    p.button.click()
    want = pipe("a dog", image=init, mask_image=p.painter.mask_image(), strength=1.0, num_inference_steps=4,
                seed=1, progress=False)[0]
    assert p.result.tobytes() == want.tobytes()
    assert p.outside_change() == (0, 0)
    got, before = np.asarray(p.result), np.asarray(init)
    assert (got[:, 4:] != before[:, 4:]).any()                             # inside: repainted
    assert "0 of 32 pixels changed" in p.status.value
    assert all(v.value[:4] == b"\x89PNG" for v in p.views)


def test_lora_scale_panel_sets_the_scale_and_redraws(pipe, tmp_path):
    from spark_lab.diffusion.lora_edit import style_lora

    with pytest.raises(ValueError, match="no LoRA is loaded"):
        wi.LoRAScalePanel(pipe, ["a cat"], num_inference_steps=2).show()
    lora = style_lora(pipe, "fire", tmp_path / "fire.safetensors", captions=["a cat", "a dog", "a red apple"])
    prompts = ["a cat", "a rocket"]
    kw = dict(num_inference_steps=3, seed=0, progress=False)
    want = pipe(prompt_embeds=lora.embeds(pipe.encode_prompt(prompts), 1.5), output_type="np", **kw)
    pipe.load_lora_weights(lora.path, scale=0.0, fuse=False)
    try:
        panel = wi.LoRAScalePanel(pipe, prompts, scale=0.5, num_inference_steps=3, seed=0)
        panel.slider.value = 1.5                                           # moving the slider redraws
        assert pipe.adapters[-1].scale == 1.5 and "scale 1.50" in panel.status.value
        got = np.stack([np.asarray(im, np.float32) / 255.0 for im in panel.images])
        np.testing.assert_allclose(got, want, atol=0.5 / 255.0 + 1e-6)     # 8-bit images vs floats
    finally:
        pipe.unload_lora_weights()
    assert np.abs(want - pipe(prompts, output_type="np", **kw)).max() > 1e-2   # the LoRA made a difference


def test_gallery_tile_to_image_to_image_and_back_into_the_gallery(pipe):
    from spark_lab.widgets import ImageGallery

    g = ImageGallery(pipe, num_inference_steps=3, seed=4)
    g.prompt.value = "a smiling sun"
    g.button.click()                                                       # tile 0: text to image
    g.seed.value = 5
    g.generate("a cat")                                                    # tile 1
    p = wi.ImageToImagePanel(pipe, gallery=g, prompt="a ghost", strength=0.6, num_inference_steps=5, seed=2)
    assert p.image.tobytes() == g.images[1].tobytes()                      # none chosen yet: the newest tile
    g.gallery.children[0].children[2].click()                              # tile 0's "use as init"
    assert g.selected == 0 and "tile 0" in g.selection.value and p.image.tobytes() == g.images[0].tobytes()
    assert g.gallery.children[0].layout.border != g.gallery.children[1].layout.border   # tile 0 is outlined
    p.button.click()
    want = pipe("a ghost", image=g.images[0], strength=0.6, num_inference_steps=5, seed=2, progress=False)[0]
    assert len(g.images) == 3 and len(g.gallery.children) == 3
    np.testing.assert_array_equal(np.asarray(g.images[2]), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(p.result), np.asarray(want))
    assert g.captions == ["a smiling sun (seed 4)", "a cat (seed 5)", "a ghost (seed 2, strength 0.60)"]
    assert "a ghost (seed 2, strength 0.60)" in g.gallery.children[2].children[1].value
    g.gallery.children[2].children[2].click()                              # continue from the result's tile
    assert p.image.tobytes() == want.tobytes()
    # an uploaded picture becomes a tile and the init image
    g._on_upload({"new": ({"name": "big.png", "content": memoryview(png_bytes(picture(24, 16, seed=3)))},)})
    assert g.selected == 3 and g.captions[3] == "upload: big.png" and p.image.size == (8, 8)
    with pytest.raises(ValueError, match="no tile 7"):
        g.select(7)
    with pytest.raises(ValueError, match="no init image"):
        wi.ImageToImagePanel(pipe, gallery=ImageGallery(pipe))


def test_gallery_tile_to_inpainting_and_back_into_the_gallery(pipe):
    pytest.importorskip("ipycanvas")
    from spark_lab.widgets import ImageGallery

    g = ImageGallery(pipe, num_inference_steps=3, seed=6)
    g.generate("a dog")
    g.generate("a red apple")
    p = wi.InpaintPanel(pipe, gallery=g, prompt="a rocket", num_inference_steps=4, seed=1)
    p.painter.paint_rect(0, 0, 4, 8)                                       # the left half
    g.select(0)                                                            # the mask stays, the image changes
    assert p.image.tobytes() == g.images[0].tobytes() and p.painter.mask.sum() == 32
    p.button.click()
    want = pipe("a rocket", image=g.images[0], mask_image=p.painter.mask_image(), strength=1.0,
                num_inference_steps=4, seed=1, progress=False)[0]
    assert len(g.images) == 3
    np.testing.assert_array_equal(np.asarray(g.images[2]), np.asarray(want))
    assert p.outside_change() == (0, 0)
    assert g.captions[2] == "a rocket (seed 1, strength 1.00, mask 32 px)"
    # an uploaded mask works the same way
    right = Image.new("L", (8, 8), 0)
    right.paste(255, (4, 0, 8, 8))
    p.painter._on_upload({"new": ({"name": "m.png", "content": memoryview(png_bytes(right))},)})
    p.repaint()
    want = pipe("a rocket", image=g.images[0], mask_image=right, strength=1.0, num_inference_steps=4, seed=1,
                progress=False)[0]
    np.testing.assert_array_equal(np.asarray(g.images[3]), np.asarray(want))


def test_gallery_captions_name_a_loaded_lora(pipe, tmp_path):
    from spark_lab.diffusion.lora_edit import style_lora
    from spark_lab.widgets import ImageGallery

    lora = style_lora(pipe, "fire", tmp_path / "fire.safetensors", captions=["a cat", "a dog", "a red apple"])
    g = ImageGallery(pipe, num_inference_steps=2)
    pipe.load_lora_weights(lora.path, scale=0.5, fuse=False)
    try:
        panel = wi.LoRAScalePanel(pipe, ["a cat"], num_inference_steps=2)
        panel.slider.value = 1.25
        g.generate("a cat")
    finally:
        pipe.unload_lora_weights()
    g.generate("a cat")
    assert g.captions == ["a cat (seed 0, LoRA fire 1.25)", "a cat (seed 0)"]
    assert g.images[0].tobytes() != g.images[1].tobytes()
