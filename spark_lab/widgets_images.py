"""ipywidgets front ends for image-to-image, inpainting and LoRA scales (notebook 04).

Like widgets.py, each panel is an `ipywidgets.VBox` with a plain method that does what its button
does (`ImageToImagePanel.run`, `InpaintPanel.repaint`, `LoRAScalePanel.show`, `MaskPainter.paint`),
so a notebook can press it once by itself and a test can drive it without a browser.

Given `gallery=` (a `widgets.ImageGallery`), the image-to-image and inpainting panels start from the
gallery's chosen tile, follow its "use as init" buttons and uploads, and add each result to the
gallery as a new tile captioned with its prompt, seed and strength.

The mask painter draws on an ipycanvas `MultiCanvas` (layer 0: the image, layer 1: the mask in
translucent blue); the mask itself lives here, in `MaskPainter.mask` ([H, W] bool, True = repaint),
so the canvas is only a view of it and is redrawn whenever a browser view (re)connects.
"""
from __future__ import annotations

import html
import io
import time

import ipywidgets as widgets
import numpy as np

MASK_RGBA = "rgba(30, 90, 255, 0.6)"      # how a pixel to repaint shows over the image (blue: emoji are warm)


# ----------------------------------------------------------------------------- images

def native_size(pipe) -> int:
    """The side the model was trained at, in pixels (spark-emoji: 32)."""
    return int((pipe.unet.config.sample_size or 64) * getattr(pipe, "vae_scale_factor", 1))


def fit_image(image, size: int):
    """A PIL image, path, bytes or array -> an RGB PIL image size x size (centre square crop, Lanczos)."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
    elif not hasattr(image, "convert"):
        from .diffusion.image_inputs import load_image
        a = load_image(image)                                              # [H, W, 1|3] in [0, 1]
        a = np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a
        image = Image.fromarray((a * 255.0 + 0.5).astype(np.uint8))
    image = image.convert("RGB")
    w, h = image.size
    if (w, h) != (size, size):
        s = min(w, h)
        image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        image = image.resize((size, size), Image.LANCZOS)
    return image


def uploaded(value):
    """A FileUpload's value (ipywidgets 8: a tuple of {name, content, ...}) -> the last file's bytes, or None."""
    if not value:
        return None
    last = value[-1] if isinstance(value, (list, tuple)) else list(value.values())[-1]
    return bytes(last["content"])


def png(img, size: int = 128) -> bytes:
    """PIL image -> PNG bytes, scaled up by a whole factor with nearest sampling (pixels stay crisp)."""
    from PIL import Image

    k = max(1, size // max(img.size))
    if k > 1:
        img = img.resize((img.width * k, img.height * k), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_view(img=None, size: int = 128) -> widgets.Image:
    view = widgets.Image(format="png", width=size, height=size)
    if img is not None:
        view.value = png(img, size)
    return view


def captioned(view: widgets.Widget, text: str) -> widgets.VBox:
    label = widgets.HTML(f'<div style="font-size:11px;text-align:center">{html.escape(text)}</div>')
    return widgets.VBox([view, label])


def error_html(e: Exception) -> str:
    return f'<span style="color:#c62828">{html.escape(type(e).__name__)}: {html.escape(str(e))}</span>'


def strength_plan(pipe, num_inference_steps: int, strength: float) -> dict:
    """What `strength` does on this pipeline's scheduler: the steps it runs, the first timestep t, and
    the start's mix x_t = image * sqrt(alpha_bar_t) + noise * sqrt(1 - alpha_bar_t) (None without alphas)."""
    from .diffusion.image_inputs import strength_timesteps

    sched = pipe.scheduler
    sched.set_timesteps(int(num_inference_steps))
    timesteps, start = strength_timesteps(sched, int(num_inference_steps), strength)
    t = int(timesteps[0])
    abar = getattr(sched, "alphas_cumprod", None)
    image, noise = (float(np.sqrt(float(abar[t]))), float(np.sqrt(1.0 - float(abar[t])))) if abar is not None \
        else (None, None)
    return {"strength": float(strength), "steps": len(timesteps), "of": int(num_inference_steps), "start": t,
            "image": image, "noise": noise}


def describe_plan(plan: dict) -> str:
    mix = f" (x_t = {plan['image']:.2f} image + {plan['noise']:.2f} noise)" if plan["noise"] is not None else ""
    return (f"strength {plan['strength']:.2f}: the last {plan['steps']} of {plan['of']} steps, "
            f"from t = {plan['start']}{mix}")


def gallery_image(image, gallery):
    """The init image a panel starts from: the one given, else the gallery's chosen (or newest) tile."""
    if image is None and gallery is not None:
        image = gallery.init_image
    if image is None:
        raise ValueError("no init image: give image=, or a gallery= with at least one tile")
    return image


class _Panel(widgets.VBox):
    """A pipeline call behind a button: disabled while it runs, errors in the status line; with a
    gallery, its chosen tile becomes the init image and each result a new tile."""

    def _follow(self, gallery):
        self.gallery = gallery
        if gallery is not None:
            gallery.on_select(self.set_image)

    def _call(self, **kw):
        self.button.disabled = True
        t0 = time.perf_counter()
        try:
            out = self.pipe(progress=False, **kw)
        except Exception as e:
            self.status.value = error_html(e)
            raise
        finally:
            self.button.disabled = False
        self.seconds = time.perf_counter() - t0
        return out


# ----------------------------------------------------------------------------- image to image

class ImageToImagePanel(_Panel):
    """An init image (the one given, a gallery tile, or an upload), a prompt and a strength in; the
    result beside it (and in the gallery)."""

    def __init__(self, pipe, image=None, prompt: str = "", strength: float = 0.8, num_inference_steps: int = 25,
                 seed: int = 0, size: int = 160, gallery=None):
        self.pipe, self.size = pipe, size
        self.side = native_size(pipe)
        self.image = fit_image(gallery_image(image, gallery), self.side)
        self.result = None
        self.prompt = widgets.Text(value=prompt, description="prompt", layout=widgets.Layout(width="50%"))
        self.strength = widgets.FloatSlider(value=strength, min=0.05, max=1.0, step=0.05, description="strength",
                                            readout_format=".2f")
        self.steps = widgets.IntSlider(value=num_inference_steps, min=1, max=100, description="steps")
        self.seed = widgets.IntText(value=seed, description="seed", layout=widgets.Layout(width="150px"))
        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="init image")
        self.button = widgets.Button(description="Run", button_style="primary")
        self.keep = widgets.Button(description="Use result as init", tooltip="continue from the result")
        self.init_view, self.result_view = image_view(self.image, size), image_view(None, size)
        self.status = widgets.HTML()
        self.upload.observe(self._on_upload, names="value")
        self.button.on_click(lambda _b: self.run())
        self.keep.on_click(lambda _b: self.set_image(self.result) if self.result is not None else None)
        super().__init__([widgets.HBox([self.prompt, self.button]),
                          widgets.HBox([self.strength, self.steps, self.seed]),
                          widgets.HBox([self.upload, self.keep]),
                          widgets.HBox([captioned(self.init_view, "init image"),
                                        captioned(self.result_view, "result")]),
                          self.status])
        self._follow(gallery)

    def set_image(self, image):
        self.image = fit_image(image, self.side)
        self.init_view.value = png(self.image, self.size)

    def _on_upload(self, change):
        data = uploaded(change["new"])
        if data is not None:
            self.set_image(data)

    def run(self):
        """Image to image with the panel's settings; returns the PIL result."""
        steps, s = int(self.steps.value), float(self.strength.value)
        try:
            plan = describe_plan(strength_plan(self.pipe, steps, s))
        except ValueError as e:
            self.status.value = error_html(e)
            raise
        seed = int(self.seed.value)
        self.result = self._call(prompt=self.prompt.value, image=self.image, strength=s,
                                 num_inference_steps=steps, seed=seed)[0]
        self.result_view.value = png(self.result, self.size)
        if self.gallery is not None:
            self.gallery.add(self.result, self.prompt.value, seed=seed, strength=s)
        self.status.value = f"{html.escape(plan)}; {self.seconds:.2f} s"
        return self.result


# ----------------------------------------------------------------------------- inpainting

class MaskPainter(widgets.VBox):
    """Paint which pixels to repaint over an image with the mouse (ipycanvas); or upload a mask.

    `mask` [H, W] bool, True = repaint (white in `mask_image()`). The brush is a square of
    `brush` image pixels; the canvas shows each image pixel as zoom x zoom screen pixels."""

    def __init__(self, image, zoom: int = 8, brush: int = 4):
        try:
            from ipycanvas import MultiCanvas
        except ImportError:
            raise ImportError("MaskPainter needs ipycanvas: pip install ipycanvas (`make lab` installs it)") from None
        self.image = image.convert("RGB")
        W, H = self.image.size
        self.zoom = int(zoom)
        self.mask = np.zeros((H, W), dtype=bool)
        self._drawing = False
        self.canvas = MultiCanvas(2, width=W * self.zoom, height=H * self.zoom,
                                  layout=widgets.Layout(width=f"{W * self.zoom}px", height=f"{H * self.zoom}px"))
        self.brush = widgets.IntSlider(value=brush, min=1, max=max(1, max(W, H) // 2), description="brush")
        self.mode = widgets.ToggleButtons(options=["paint", "erase"], value="paint",
                                          style=widgets.ToggleButtonsStyle(button_width="70px"))
        self.clear_button = widgets.Button(description="Clear")
        self.invert_button = widgets.Button(description="Invert")
        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="mask image")
        self.count = widgets.HTML()
        self.canvas.on_mouse_down(self._down)
        self.canvas.on_mouse_move(self._move)
        self.canvas.on_mouse_up(self._up)
        self.canvas.on_mouse_out(self._up)
        self.canvas.on_client_ready(self.redraw)          # a view that (re)connects starts blank
        self.clear_button.on_click(lambda _b: self.set_mask(np.zeros_like(self.mask)))
        self.invert_button.on_click(lambda _b: self.set_mask(~self.mask))
        self.upload.observe(self._on_upload, names="value")
        super().__init__([self.canvas, widgets.HBox([self.mode, self.brush]),
                          widgets.HBox([self.clear_button, self.invert_button, self.upload]), self.count])
        self.redraw()

    # the mask
    def paint(self, x: int, y: int, value: bool = True):
        """Brush at image pixel (x, y): a square of `brush` pixels set to `value`."""
        b = int(self.brush.value)
        x0, y0 = int(x) - (b - 1) // 2, int(y) - (b - 1) // 2
        self.paint_rect(x0, y0, x0 + b, y0 + b, value)

    def paint_rect(self, left: int, top: int, right: int, bottom: int, value: bool = True):
        """Set pixels [top:bottom, left:right] of the mask (image pixels, clipped to the image)."""
        H, W = self.mask.shape
        left, right = max(0, left), min(W, right)
        top, bottom = max(0, top), min(H, bottom)
        if left >= right or top >= bottom:
            return
        self.mask[top:bottom, left:right] = bool(value)
        self._draw_rect(left, top, right, bottom)
        self._count()

    def set_mask(self, mask):
        """A bool/0-1 array, or an image (white = repaint, resized to the image's size) -> the mask."""
        from PIL import Image

        if hasattr(mask, "convert") or isinstance(mask, (bytes, bytearray, memoryview)):
            m = Image.open(io.BytesIO(bytes(mask))) if not hasattr(mask, "convert") else mask
            m = m.convert("L").resize(self.image.size, Image.NEAREST)
            mask = np.asarray(m) >= 128
        mask = np.asarray(mask)
        if mask.shape != self.mask.shape:
            raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                             f"{self.mask.shape[1]}x{self.mask.shape[0]}")
        self.mask = mask.astype(bool)
        self.redraw()

    def set_image(self, image):
        image = image.convert("RGB")
        if image.size != self.image.size:
            raise ValueError(f"image is {image.size[0]}x{image.size[1]}, the painter is "
                             f"{self.image.size[0]}x{self.image.size[1]}")
        self.image = image
        self.redraw()

    def mask_image(self):
        """The mask as a PIL "L" image, white (255) = repaint, black = keep."""
        from PIL import Image
        return Image.fromarray(self.mask.astype(np.uint8) * 255, mode="L")

    # drawing
    def redraw(self, *_):
        from ipycanvas import hold_canvas

        z = self.zoom
        big = np.repeat(np.repeat(np.asarray(self.image), z, axis=0), z, axis=1)       # [H*z, W*z, 3]
        rgba = np.concatenate([big, np.full(big.shape[:2] + (1,), 255, np.uint8)], axis=2)  # RGBA: sent as PNG
        with hold_canvas():
            self.canvas[0].put_image_data(rgba, 0, 0)
            top = self.canvas[1]
            top.clear()
            ys, xs = np.nonzero(self.mask)
            if len(xs):
                top.fill_style = MASK_RGBA
                top.fill_rects(xs * z, ys * z, z, z)
        self._count()

    def _draw_rect(self, left, top, right, bottom):
        from ipycanvas import hold_canvas

        z, layer = self.zoom, self.canvas[1]
        with hold_canvas():
            layer.clear_rect(left * z, top * z, (right - left) * z, (bottom - top) * z)
            ys, xs = np.nonzero(self.mask[top:bottom, left:right])
            if len(xs):
                layer.fill_style = MASK_RGBA
                layer.fill_rects((xs + left) * z, (ys + top) * z, z, z)

    def _count(self):
        n, total = int(self.mask.sum()), self.mask.size
        self.count.value = f"{n} of {total} pixels will be repainted (blue)"

    # the mouse
    def _down(self, x, y):
        self._drawing = True
        self.paint(x // self.zoom, y // self.zoom, self.mode.value == "paint")

    def _move(self, x, y):
        if self._drawing:
            self.paint(x // self.zoom, y // self.zoom, self.mode.value == "paint")

    def _up(self, x, y):
        self._drawing = False

    def _on_upload(self, change):
        data = uploaded(change["new"])
        if data is not None:
            self.set_mask(data)


class InpaintPanel(_Panel):
    """Paint a mask over the image (the one given, a gallery tile, or an upload), give a prompt, press
    Repaint: image, mask and result side by side (the result in the gallery too), and how many pixels
    outside the mask changed (none should)."""

    def __init__(self, pipe, image=None, prompt: str = "", strength: float = 1.0, num_inference_steps: int = 25,
                 seed: int = 0, zoom: int = 8, size: int = 128, gallery=None):
        self.pipe, self.size = pipe, size
        self.side = native_size(pipe)
        self.painter = MaskPainter(fit_image(gallery_image(image, gallery), self.side), zoom=zoom)
        self.result = None
        self.prompt = widgets.Text(value=prompt, description="prompt", layout=widgets.Layout(width="50%"))
        self.strength = widgets.FloatSlider(value=strength, min=0.05, max=1.0, step=0.05, description="strength",
                                            readout_format=".2f")
        self.steps = widgets.IntSlider(value=num_inference_steps, min=1, max=100, description="steps")
        self.seed = widgets.IntText(value=seed, description="seed", layout=widgets.Layout(width="150px"))
        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="image")
        self.button = widgets.Button(description="Repaint", button_style="primary")
        self.views = [image_view(None, size) for _ in range(3)]
        self.status = widgets.HTML()
        self.upload.observe(self._on_upload, names="value")
        self.button.on_click(lambda _b: self.repaint())
        row = widgets.HBox([captioned(v, t) for v, t in zip(self.views, ["image", "mask (white = repaint)", "result"])])
        super().__init__([widgets.HBox([self.prompt, self.button]),
                          widgets.HBox([self.strength, self.steps, self.seed]),
                          widgets.HBox([self.painter, widgets.VBox([self.upload])]), row, self.status])
        self._follow(gallery)

    @property
    def image(self):
        return self.painter.image

    def set_image(self, image):
        """A new image under the painted mask (the mask stays)."""
        self.painter.set_image(fit_image(image, self.side))

    def _on_upload(self, change):
        data = uploaded(change["new"])
        if data is not None:
            self.set_image(data)

    def repaint(self):
        """Inpaint the painted region with the panel's prompt; returns the PIL result."""
        mask = self.painter.mask_image()
        s, seed = float(self.strength.value), int(self.seed.value)
        self.result = self._call(prompt=self.prompt.value, image=self.image, mask_image=mask,
                                 strength=s, num_inference_steps=int(self.steps.value), seed=seed)[0]
        for view, img in zip(self.views, [self.image, mask.convert("RGB"), self.result]):
            view.value = png(img, self.size)
        if self.gallery is not None:
            self.gallery.add(self.result, self.prompt.value, seed=seed, strength=s,
                             mask=f"{int(self.painter.mask.sum())} px")
        changed, biggest = self.outside_change()
        kept = int((~self.painter.mask).sum())
        self.status.value = (f"outside the mask {changed} of {kept} pixels changed (largest difference "
                             f"{biggest} of 255); {self.seconds:.2f} s")
        return self.result

    def outside_change(self) -> tuple:
        """(pixels outside the mask that differ from the image, the largest difference in 0..255)."""
        if self.result is None:
            raise ValueError("nothing repainted yet: call repaint() first")
        diff = np.abs(np.asarray(self.result, np.int16) - np.asarray(self.image, np.int16)).max(axis=2)  # [H, W]
        keep = ~self.painter.mask
        return int((diff[keep] > 0).sum()), int(diff[keep].max()) if keep.any() else 0


# ----------------------------------------------------------------------------- LoRA

class LoRAScalePanel(widgets.VBox):
    """A slider for the strength of the last unfused LoRA on `pipe`; the prompts' images follow it."""

    def __init__(self, pipe, prompts, scale: float = 1.0, max_scale: float = 2.0, num_inference_steps: int = 25,
                 seed: int = 0, size: int = 96):
        self.pipe, self.size = pipe, size
        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.steps, self.seed_value = int(num_inference_steps), int(seed)
        self.images: list = []
        self.slider = widgets.FloatSlider(value=scale, min=0.0, max=max_scale, step=0.25, description="LoRA scale",
                                          continuous_update=False, readout_format=".2f")
        self.views = [image_view(None, size) for _ in self.prompts]
        self.status = widgets.HTML()
        self.slider.observe(lambda change: self.show(change["new"]), names="value")
        super().__init__([self.slider, widgets.HBox([captioned(v, p) for v, p in zip(self.views, self.prompts)]),
                          self.status])

    def show(self, scale: float | None = None):
        """Set the LoRA's scale (set_lora_scale: no reload) and draw the prompts; returns the PIL images."""
        scale = float(self.slider.value if scale is None else scale)
        try:
            self.pipe.set_lora_scale(scale)
            t0 = time.perf_counter()
            self.images = self.pipe(self.prompts, num_inference_steps=self.steps, seed=self.seed_value,
                                    progress=False)
        except Exception as e:
            self.status.value = error_html(e)
            raise
        for view, img in zip(self.views, self.images):
            view.value = png(img, self.size)
        self.status.value = f"scale {scale:.2f}: {len(self.images)} images in {time.perf_counter() - t0:.2f} s"
        return self.images
