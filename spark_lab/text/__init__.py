"""Text encoders: BERT (MiniLM sentence embeddings) and CLIP text (for diffusion conditioning)."""
from .bert import BertConfig, BertModel, SentenceEncoder

__all__ = ["BertConfig", "BertModel", "SentenceEncoder", "CLIPTextModel"]


def __getattr__(name):
    # clip.py is another module of this package; import it on first use so that the BERT
    # side works (and imports fast) without it.
    if name == "CLIPTextModel":
        from .clip import CLIPTextModel
        return CLIPTextModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
