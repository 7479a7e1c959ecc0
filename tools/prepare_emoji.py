"""Render the Noto Color Emoji font into a 32x32 captioned data set for spark-emoji.

Dev-only tool (spark_lab never imports it). It installs nothing; it needs:

    apt-get install -y fonts-noto-color-emoji     # the font (SIL Open Font License 1.1)
    pip install pillow emoji                      # Pillow built with raqm for ZWJ/flag ligatures

Output (outside the repo; data/ is never committed):

    <out>/images.npy      uint8 [N, 32, 32, 3]  RGB, emoji composited on white
    <out>/captions.json   list of N {"emoji", "primary", "captions": [...]}
    <out>/preview.png     the first 256 images as a 16x16 grid

Rendering: the font is a CBDT bitmap font, so Pillow can only draw it at size 109 (its one
strike, a 136x128 glyph). Each glyph is drawn RGBA with embedded_color=True, composited on a
white square (white because that is how emoji are usually seen; the model learns "white
background" as part of every image), then downscaled with Lanczos in one step. Glyphs the font
does not have (newer Unicode, or sequences that do not ligate into one glyph) are skipped.

Captions: lower-cased. The primary caption is the Unicode character name (`unicodedata.name`,
"grinning face with smiling eyes") for single code points and the CLDR short name from the
`emoji` package for sequences ("man technologist", "flag: germany"). The CLDR name and the
`emoji` aliases are extra captions when they are not some other emoji's primary caption. The
trainer samples one caption per image per step.

    python tools/prepare_emoji.py --out ~/.cache/spark_lab/emoji
"""

from __future__ import annotations

import argparse
import json
import re
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
STRIKE = 109  # the only pixel size a CBDT font can be drawn at
SKIN_TONES = set(map(chr, range(0x1F3FB, 0x1F400)))
FE0F = "\ufe0f"


def clean_name(s: str) -> str:
    """':flag_for_Germany:' -> 'flag for germany'."""
    s = s.strip(":").replace("_", " ").lower()
    s = re.sub(r"[()“”\"]", "", s)
    return re.sub(r"\s+", " ", s).strip()


def is_flag(e: str) -> bool:
    return all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in e) or e.startswith("\U0001F3F4\U000E0067")


def captions_for(e: str, info: dict) -> tuple[str, list[str]]:
    """emoji -> (primary caption, all captions with the primary first)."""
    core = e.replace(FE0F, "")
    cldr = clean_name(info["en"])
    names = []
    if len(core) == 1:
        try:
            names.append(unicodedata.name(core).lower())
        except ValueError:
            pass
    if is_flag(e):
        names += [f"flag: {cldr}", f"flag of {cldr}"]
    names.append(cldr)
    names += [clean_name(a) for a in info.get("alias", []) if len(clean_name(a)) > 2]  # not "v", "ru"
    out = []
    for n in names:
        if n and n not in out:
            out.append(n)
    return out[0], out


def render(font: ImageFont.FreeTypeFont, e: str, size: int) -> np.ndarray | None:
    """One emoji -> uint8 [size, size, 3] on white, or None if it is not a single glyph."""
    w = font.getlength(e)
    if w > 140:  # the sequence did not ligate: several glyphs side by side
        return None
    glyph = Image.new("RGBA", (136, 136), (255, 255, 255, 0))
    ImageDraw.Draw(glyph).text((0, 4), e, font=font, embedded_color=True)
    a = np.asarray(glyph)[..., 3]
    if a.max() == 0:
        return None
    bg = Image.new("RGBA", glyph.size, (255, 255, 255, 255))
    img = Image.alpha_composite(bg, glyph).convert("RGB")
    return np.asarray(img.resize((size, size), Image.LANCZOS))  # [size, size, 3]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="~/.cache/spark_lab/emoji", help="output folder (outside the repo)")
    ap.add_argument("--font", default=FONT, help="NotoColorEmoji.ttf (fonts-noto-color-emoji)")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--skin-tones", action="store_true", help="also keep skin-tone variants (off: same shapes, 2x data)")
    args = ap.parse_args(argv)

    import emoji  # dev-only: pip install emoji

    font_path = Path(args.font)
    if not font_path.exists():
        raise FileNotFoundError(f"{font_path} not found: apt-get install -y fonts-noto-color-emoji")
    if not features.check("raqm"):
        print("warning: Pillow has no raqm; ZWJ sequences and flags will be skipped")
    font = ImageFont.truetype(str(font_path), STRIKE)
    tofu = render(font, "\U0010FFFD", args.size)  # what a missing glyph looks like

    entries = [(e, i) for e, i in emoji.EMOJI_DATA.items() if i["status"] == emoji.STATUS["fully_qualified"]]
    if not args.skin_tones:
        entries = [(e, i) for e, i in entries if not SKIN_TONES & set(e)]
    primaries = {e: captions_for(e, i) for e, i in entries}
    taken = {}
    for e, (p, _) in primaries.items():
        taken.setdefault(p, e)

    images, rows, skipped = [], [], 0
    for e, info in entries:
        img = render(font, e, args.size)
        if img is None or (tofu is not None and np.array_equal(img, tofu)):
            skipped += 1
            continue
        p, caps = primaries[e]
        if taken[p] != e:  # two emoji share one Unicode name: keep the first
            skipped += 1
            continue
        caps = [c for c in caps if c == p or taken.get(c, e) == e]
        images.append(img)
        rows.append({"emoji": e, "primary": p, "captions": caps})

    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    x = np.stack(images)  # [N, size, size, 3] uint8
    np.save(out / "images.npy", x)
    (out / "captions.json").write_text(json.dumps(rows, ensure_ascii=False, indent=0))
    k = min(256, len(x)) // 16 * 16
    grid = x[:k].reshape(k // 16, 16, args.size, args.size, 3).transpose(0, 2, 1, 3, 4)
    Image.fromarray(grid.reshape(k // 16 * args.size, 16 * args.size, 3)).save(out / "preview.png")
    n_caps = len({c for r in rows for c in r["captions"]})
    print(f"{len(x)} emoji, {n_caps} captions, {skipped} skipped -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
