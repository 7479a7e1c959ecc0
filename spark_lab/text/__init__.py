"""Text encoders: BERT (MiniLM sentence embeddings), CLIP text and T5 (for diffusion conditioning)."""
from .bert import BertConfig, BertModel, SentenceEncoder

__all__ = ["BertConfig", "BertModel", "SentenceEncoder", "CLIPTextModel", "CLIPTextModelWithProjection",
           "T5EncoderModel", "T5Tokenizer"]


def __getattr__(name):
    # clip.py and t5.py are other modules of this package; import them on first use so that the
    # BERT side works (and imports fast) without them.
    if name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        from . import clip
        return getattr(clip, name)
    if name in ("T5EncoderModel", "T5Tokenizer", "T5TokenizerFast"):
        from . import t5
        return getattr(t5, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
