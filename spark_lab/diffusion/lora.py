"""LoRA: low-rank weight updates read from a safetensors file, fused into the weights or added at run time.

For every adapted layer W [out, in] (a conv: [out, in, kh, kw]) a LoRA file holds two factors

    down (A) [r, in]   (conv [r, in, kh, kw])       up (B) [out, r]   (conv [out, r, 1, 1])

and maybe an alpha; the layer becomes  W + scale * (alpha / r) * B @ A  (no alpha: alpha = r,
PEFT's use_rslora: alpha / sqrt(r)).

Key spellings this module reads (one file may mix the model parts, not the spellings of one layer):
  diffusers / PEFT    unet.<module>.lora_A.weight + .lora_B.weight, text_encoder.<...>, text_encoder_2.<...>;
                      alpha from `<module>.alpha`, else the file's `lora_adapter_metadata` (PEFT's
                      lora_alpha, alpha_pattern, use_rslora), else alpha = r
  diffusers (older)   unet.<module>.lora.down.weight / .lora.up.weight, attn1.processor.to_q_lora.down.weight,
                      text_encoder.<...>.self_attn.to_q_lora.down.weight, mlp.fc1.lora_linear_layer.down.weight
  kohya (sd-scripts)  lora_unet_<module, dots as _>.lora_down.weight / .lora_up.weight / .alpha;
                      lora_te_ and lora_te1_ (text_encoder), lora_te2_ (text_encoder_2); SDXL files name
                      the UNet's blocks the original (SGM) way: input_blocks_4_1_..., middle_block_1_...,
                      output_blocks_2_2_conv, in_layers_2, emb_layers_1, out_layers_3, skip_connection

A model part is a plain weights dict (name -> array): `unet.params.tensors`, `text_encoder.w`.
Two ways to apply a file (`LoRAWeights.apply`):
  fused     W' = W + delta is written as a new array and the original array is kept: removing the
            LoRA puts the very same array back (bit-exact), and each denoising step costs nothing extra.
  unfused   the factors are stored beside the weight as `<module>.lora` (a `LoRAStack`) and the layer
            adds scale * (x @ A.T) @ B.T at run time (`with_lora`, `with_lora_conv`): the scale can
            change between calls (`Adapter.scale`) for two thin matmuls per adapted layer.
A file whose layers are not all found here, or do not fit the shapes here, is refused with one
ValueError naming the file: it is almost always a LoRA for another model family.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..kernels import conv2d

KOHYA_PARTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
               "lora_te2_": "text_encoder_2"}
PARTS = ("unet", "text_encoder", "text_encoder_2", "transformer", "prior")
# the factor suffixes, longest first: (suffix, which factor)
SUFFIXES = ((".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
            (".lora_A.weight", "down"), (".lora_B.weight", "up"),
            (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
            (".lora.down.weight", "down"), (".lora.up.weight", "up"),
            ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
            (".lora_down.weight", "down"), (".lora_up.weight", "up"),
            (".alpha", "alpha"))
UNET_HEADS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding", "add_embedding")


# ----------------------------------------------------------------------------- the file

@dataclass
class LoRALayer:
    part: str            # "unet", "text_encoder", "text_encoder_2", ...
    name: str            # the module it adapts, the part's prefix removed (diffusers or kohya spelling)
    kohya: bool          # name is kohya's underscore spelling: resolved against the model's modules
    down: np.ndarray     # A [r, in] or [r, in, kh, kw], host float32
    up: np.ndarray       # B [out, r] or [out, r, 1, 1]
    alpha: float | None
    key: str = ""        # the layer's name as the file spells it (for messages)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoRAWeights:
    """A LoRA file read into host arrays; `apply` puts it on a model's parts."""
    path: str
    layers: list
    metadata: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return Path(self.path).name or self.path

    @classmethod
    def from_file(cls, path: str | Path) -> "LoRAWeights":
        from .loading import read_safetensors

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"missing LoRA file: {path}")
        tensors = read_safetensors(path)
        return cls.from_tensors(tensors, str(path), _adapter_metadata(path))

    @classmethod
    def from_tensors(cls, tensors: dict, label: str = "LoRA", metadata: dict | None = None) -> "LoRAWeights":
        """{key: array} in any spelling above -> LoRAWeights (keys grouped into layers, alphas attached)."""
        groups: dict = {}
        for key, a in tensors.items():
            for suffix, what in SUFFIXES:
                if key.endswith(suffix):
                    name = key[:-len(suffix)]
                    if what == "alpha":                  # "...to_q_lora.alpha", "...proj_out.lora.alpha"
                        for tail in ("_lora", ".lora", ".lora_linear_layer"):
                            name = name.removesuffix(tail)
                    groups.setdefault(name, {})[what] = a
                    break
            else:
                kind = "DoRA" if "dora_scale" in key or "magnitude" in key else \
                       "LoHa/LoKr" if re.search(r"hada_|lokr_", key) else None
                what = f"a {kind} tensor, which spark_lab does not read" if kind else "not a LoRA factor"
                raise ValueError(f"LoRA {Path(label).name}: key {key!r} is {what}")
        layers = []
        meta = metadata or {}
        for name, g in groups.items():
            if "down" not in g or "up" not in g:
                if set(g) == {"alpha"}:
                    continue                        # an alpha whose layer has no factors: nothing to do
                raise ValueError(f"LoRA {Path(label).name}: layer {name!r} has "
                                 f"{'only the up' if 'up' in g else 'only the down'} factor")
            part, rest, kohya = _split_part(name)
            down = np.ascontiguousarray(g["down"], dtype=np.float32)
            up = np.ascontiguousarray(g["up"], dtype=np.float32)
            if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
                raise ValueError(f"LoRA {Path(label).name}: layer {name!r} has factors {down.shape} and "
                                 f"{up.shape}, not [r, in] and [out, r]")
            alpha = float(np.asarray(g["alpha"]).reshape(-1)[0]) if "alpha" in g else None
            layers.append(LoRALayer(part, rest, kohya, down, up, alpha, name))
        if not layers:
            raise ValueError(f"LoRA {Path(label).name} holds no LoRA layers")
        out = cls(label, layers, meta)
        for layer in layers:
            if layer.alpha is None:
                layer.alpha = out._metadata_alpha(layer)
        return out

    def _metadata_alpha(self, layer: LoRALayer):
        """PEFT metadata: {"unet.lora_alpha": 8, "unet.alpha_pattern": {...}, "unet.use_rslora": false}."""
        m = self.metadata
        pattern = m.get(f"{layer.part}.alpha_pattern") or {}
        for k, v in pattern.items():
            if layer.name == k or layer.name.endswith("." + k):
                return float(v)
        a = m.get(f"{layer.part}.lora_alpha")
        return float(a) if a is not None else None

    def factor(self, layer: LoRALayer) -> float:
        """alpha / r (PEFT's rsLoRA: alpha / sqrt(r)); alpha = r when the file names none."""
        alpha = layer.rank if layer.alpha is None else layer.alpha
        if self.metadata.get(f"{layer.part}.use_rslora"):
            return float(alpha) / float(layer.rank) ** 0.5
        return float(alpha) / float(layer.rank)

    # ------------------------------------------------------------------ matching a model
    def resolve(self, parts: dict, family: str = "this model", unet_config=None) -> list:
        """parts {"unet": weights dict, "text_encoder": ..., ...} -> [(layer, part, weight key)].

        Every layer must name a weight of the right shape here, else one ValueError for the file."""
        flat_maps: dict = {}
        found, missing, misfit = [], [], []
        for layer in self.layers:
            weights = parts.get(layer.part)
            if weights is None:
                missing.append(layer.key)
                continue
            if layer.kohya:
                flat = flat_maps.get(layer.part)
                if flat is None:
                    flat = flat_maps[layer.part] = _flat_names(weights, layer.part)
                name = layer.name
                if layer.part == "unet" and unet_config is not None:
                    name = sgm_to_diffusers(name, unet_config)
                module = flat.get(name)
            else:
                module = _normalize(layer.name, layer.part)
            key = f"{module}.weight" if module is not None else None
            if key is None or key not in weights:
                missing.append(layer.key)
                continue
            w = weights[key]
            if not _fits(layer, w.shape):
                misfit.append(f"{module} is {list(w.shape)}, the LoRA gives {list(layer.up.shape)} @ "
                              f"{list(layer.down.shape)}")
                continue
            found.append((layer, layer.part, key))
        if missing or misfit:
            n = len(self.layers)
            why = (f"{len(missing)} of its {n} layers match no module here (e.g. {missing[0]})" if missing
                   else f"{len(misfit)} of its {n} layers do not fit ({misfit[0]})")
            guess = _family_guess(self.layers)
            hint = f" (it looks like an {guess} LoRA)" if guess and guess not in family else ""
            raise ValueError(f"LoRA {self.label} does not fit {family}: {why}; it is likely a LoRA for "
                             f"another model family{hint}")
        return found

    def apply(self, parts: dict, scale: float = 1.0, fuse: bool = True, family: str = "this model",
              unet_config=None) -> "Adapter":
        """Put this LoRA on the model parts; the returned Adapter takes it off again (`remove`)."""
        from ..device import to_device
        from ..memory import get_allocator

        found = self.resolve(parts, family, unet_config)
        adapter = Adapter(self.label, float(scale), fuse)
        alloc = get_allocator()
        for layer, part, key in found:
            weights = parts[part]
            w = weights[key]
            module = key[:-len(".weight")]
            f = self.factor(layer)
            if fuse:                                  # W + s * B @ A on the weights' device, a new array
                down, up = to_device(layer.down), to_device(layer.up)
                delta = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape)
                adapter.saved.append((weights, key, w))
                weights[key] = (w + delta * (float(scale) * f)).astype(np.float32, copy=False)
            else:                                     # the factors stay, counted as weights
                down = alloc.place(layer.down, tag="weights", what=f"lora {module} down")
                up = alloc.place(layer.up, tag="weights", what=f"lora {module} up")
                stack = weights.get(f"{module}.lora")
                if stack is None:
                    stack = weights[f"{module}.lora"] = LoRAStack()
                stack.entries.append((down, up, f, adapter))
                adapter.stacks.append((weights, f"{module}.lora", stack))
        adapter.layers = len(found)
        return adapter


class Adapter:
    """One LoRA applied to a model: its scale (live when unfused) and how to take it off."""

    def __init__(self, name: str, scale: float, fused: bool):
        self.name, self.scale, self.fused = name, scale, fused
        self.saved: list = []      # fused: (weights dict, key, original array)
        self.stacks: list = []     # unfused: (weights dict, key, LoRAStack)
        self.layers = 0

    def remove(self) -> None:
        """Unfused: drop this adapter's entries. Fused: put the original arrays back (this must be
        the most recently fused adapter still on those weights: remove fused LoRAs newest first)."""
        for weights, key, original in reversed(self.saved):
            weights[key] = original
        for weights, key, stack in self.stacks:
            stack.entries = [e for e in stack.entries if e[3] is not self]
            if not stack.entries and weights.get(key) is stack:
                del weights[key]
        self.saved, self.stacks = [], []

    def __repr__(self):
        return f"Adapter({self.name!r}, scale={self.scale}, {'fused' if self.fused else 'unfused'}, {self.layers} layers)"


class LoRAStack:
    """The unfused adapters of one layer: [(down, up, alpha / r, Adapter)]."""

    def __init__(self):
        self.entries: list = []

    @property
    def nbytes(self) -> int:   # counted like the weights it sits beside
        return int(sum(int(d.nbytes) + int(u.nbytes) for d, u, _, _ in self.entries))

    def linear(self, x):
        """x [..., in] -> sum of scale * (x @ A.T) @ B.T, [..., out] (1x1 conv factors act channels-last)."""
        x2 = x.reshape(-1, x.shape[-1])                                      # [n, in]
        out = None
        for down, up, f, adapter in self.entries:
            s = adapter.scale * f
            if s == 0.0:
                continue
            h = x2 @ down.reshape(down.shape[0], -1).T                       # [n, r]
            d = (h @ up.reshape(up.shape[0], -1).T) * s                      # [n, out]
            out = d if out is None else out + d
        return None if out is None else out.reshape(x.shape[:-1] + (out.shape[-1],))

    def conv(self, x, stride, padding):
        """x [N, in, H, W] -> sum of scale * conv1x1(conv(x, A), B), [N, out, H', W']."""
        out = None
        for down, up, f, adapter in self.entries:
            s = adapter.scale * f
            if s == 0.0:
                continue
            if down.ndim == 2:                                               # linear factors on a 1x1 conv
                down, up = down.reshape(down.shape + (1, 1)), up.reshape(up.shape + (1, 1))
            h = conv2d(x, down, None, stride=stride, padding=padding)        # [N, r, H', W']
            d = conv2d(h, up) * s                                            # [N, out, H', W']
            out = d if out is None else out + d
        return out


def with_lora(p, name: str, x, y):
    """y = layer(x) of the linear layer `name` in p (Params or a weights dict), plus its unfused LoRAs."""
    stack = p.get(f"{name}.lora" if name else "lora")
    if stack is None:
        return y
    d = stack.linear(x)
    return y if d is None else y + d


def with_lora_conv(p, x, y, stride=1, padding=0):
    """y = conv(x) of the conv whose Params is p, plus its unfused LoRAs (same stride and padding)."""
    stack = p.get("lora")
    if stack is None:
        return y
    d = stack.conv(x, stride, padding)
    return y if d is None else y + d


# ----------------------------------------------------------------------------- names

def _adapter_metadata(path: Path) -> dict:
    """The `lora_adapter_metadata` JSON diffusers writes into the safetensors header ({} if none)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return {}
    raw = (header.get("__metadata__") or {}).get("lora_adapter_metadata")
    try:
        out = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def _split_part(name: str):
    """A layer name -> (model part, the rest, kohya spelling?)."""
    for prefix, part in KOHYA_PARTS.items():
        if name.startswith(prefix):
            return part, name[len(prefix):], True
    if name.startswith("lora_transformer_"):
        return "transformer", name[len("lora_transformer_"):], True
    name = name.removeprefix("base_model.model.")
    head, _, rest = name.partition(".")
    if head in PARTS and rest:
        return head, rest, False
    if head in UNET_HEADS:                               # the oldest diffusers files: no "unet." prefix
        return "unet", name, False
    return head, rest or name, False


_CLIP_RENAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out.0": "out_proj"}


def _normalize(name: str, part: str) -> str:
    """A diffusers-spelled module name -> the weight-key prefix spark_lab uses in that part
    (attention-processor names: attn1.processor.to_out -> attn1.to_out.0, self_attn.to_q -> q_proj)."""
    name = name.replace(".processor.", ".")
    if name.endswith(".to_out"):
        name += ".0"
    if part.startswith("text_encoder"):
        name = name.removeprefix("text_model.")
        head, dot, last = name.rpartition("self_attn.")
        if dot and last in _CLIP_RENAMES:
            name = head + dot + _CLIP_RENAMES[last]
    return name


def _flat_names(weights: dict, part: str) -> dict:
    """kohya spelling -> module: every weight of a layer (2-D or 4-D), dots as underscores
    (a CLIP text encoder's modules with the `text_model_` prefix kohya keeps)."""
    out = {}
    for key, w in weights.items():
        if not key.endswith(".weight") or getattr(w, "ndim", 0) not in (2, 4):
            continue
        module = key[:-len(".weight")]
        flat = module.replace(".", "_")
        if part.startswith("text_encoder") and not module.startswith("text_projection"):
            flat = "text_model_" + flat
        out[flat] = module
    return out


def _fits(layer: LoRALayer, shape: tuple) -> bool:
    """B @ A reshapes to the weight: out rows, and in * kh * kw columns."""
    out, cols = int(layer.up.shape[0]), int(np.prod(layer.down.shape[1:]))
    return len(shape) in (2, 4) and shape[0] == out and int(np.prod(shape[1:])) == cols and \
        (layer.down.ndim == 2 or len(shape) == 4 or layer.down.shape[2:] == (1, 1))


def _family_guess(layers) -> str | None:
    """The family a LoRA's names point at, when they say ("SD3/Flux", "SDXL"), else None."""
    parts = {layer.part for layer in layers}
    names = " ".join(layer.name for layer in layers)
    if "transformer" in parts:
        return "SD3/Flux"
    if "text_encoder_2" in parts or re.search(r"input_blocks_[4-8]_1|middle_block_1_transformer_blocks_[1-9]|"
                                              r"add_embedding|label_emb", names):
        return "SDXL"
    return None


# ----------------------------------------------------------------------------- SDXL's original block names

_RESNET_RENAMES = (("in_layers_2", "conv1"), ("emb_layers_1", "time_emb_proj"), ("out_layers_3", "conv2"),
                   ("skip_connection", "conv_shortcut"))


def sgm_to_diffusers(name: str, config) -> str:
    """kohya's SDXL names (the original UNet's input/middle/output blocks) -> diffusers' flat names.

    input_blocks.0.0 is conv_in; input block i >= 1 is level (i-1)//(L+1), slot (i-1)%(L+1) of it
    (slot L: the downsampler), inner 0 a resnet and 1 a transformer; the middle block is resnet,
    transformer, resnet; output block i is level i//(L+1), slot i%(L+1), inner 0 a resnet, then the
    transformer (if that up block has one) and the upsampler. time_embed / label_emb / out.2 are
    the time MLP, the added-conditioning MLP and conv_out. Names already in diffusers' spelling pass.
    """
    lpb = config.layers_per_block if isinstance(config.layers_per_block, int) else config.layers_per_block[0]
    m = re.match(r"(input_blocks|middle_block|output_blocks)_(\d+)_?(\d+)?_(.*)$", name)
    if m is None:
        for old, new in (("time_embed_0", "time_embedding_linear_1"), ("time_embed_2", "time_embedding_linear_2"),
                         ("label_emb_0_0", "add_embedding_linear_1"), ("label_emb_0_2", "add_embedding_linear_2"),
                         ("out_2", "conv_out")):
            if name == old:
                return new
        return name
    kind, i, inner, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if kind == "middle_block":                        # middle_block_1_proj_in: the index is the inner one
        j = i
        head = {0: "mid_block_resnets_0", 1: "mid_block_attentions_0", 2: "mid_block_resnets_1"}.get(j)
        tail = f"{inner}_{tail}" if inner is not None else tail
    elif kind == "input_blocks":
        if i == 0:
            return "conv_in"
        level, slot = (i - 1) // (lpb + 1), (i - 1) % (lpb + 1)
        if slot == lpb:                               # input_blocks_3_0_op
            head, tail = f"down_blocks_{level}_downsamplers_0", tail.replace("op", "conv")
        else:
            head = f"down_blocks_{level}_{'resnets' if inner == '0' else 'attentions'}_{slot}"
    else:
        level, slot = i // (lpb + 1), i % (lpb + 1)
        up_types = list(config.up_block_types)
        has_attn = level < len(up_types) and "Attn" in up_types[level]
        if inner == "0":
            head = f"up_blocks_{level}_resnets_{slot}"
        elif inner == "1" and has_attn:
            head = f"up_blocks_{level}_attentions_{slot}"
        else:
            head = f"up_blocks_{level}_upsamplers_0"
    if head is None:
        return name
    for old, new in _RESNET_RENAMES:
        if tail == old:
            tail = new
    return f"{head}_{tail}"


def parse_lora_arg(text: str):
    """The CLI's FILE[:SCALE] -> (path, scale); a Windows drive letter or a ':' in the name stays."""
    path, sep, s = text.rpartition(":")
    if sep and path:
        try:
            return path, float(s)
        except ValueError:
            pass
    return text, 1.0
