"""Simulated annotators: a gold scorer's preferences plus human-like noise.

The gold is any scorer (``preftune.scoring``): it stands in for what people want. Noise: an
annotator with temperature T prefers A to B with the Bradley-Terry probability
``sigmoid((g_A - g_B) / T)`` on the gold scores g. We draw it as a random-utility model,
``u = g / T + Gumbel``, so a comparison picks the larger ``u`` (exactly Bradley-Terry), a ranking
sorts by ``u`` (Plackett-Luce), and a rating buckets ``g + T * (Gumbel - euler_gamma)`` at the gold
scores' quantiles. ``expected_agreement`` and ``noise_ceiling`` give what to expect analytically;
``calibrate_temperature`` finds the T that gives a target agreement (people agree about 73 %).
"""

from __future__ import annotations

import math

import numpy as np

from preftune.data.records import CandidateSet, PromptRecord, to_json
from preftune.errors import PreftuneError

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


def simulate_labels(items: list[CandidateSet], gold: list[np.ndarray], kind: str, temperatures: list[float], *,
                    scale: int = 3, pairs_per_prompt: int = 0, seed: int = 0) -> tuple[list[dict], dict]:
    """Label candidate sets (``CandidateSet``) as ``kind`` (comparisons, rankings or ratings) by one
    simulated annotator per temperature. Returns the JSONL rows and agreement statistics.

    Every annotator labels every item. Empty responses are left out and pairs of identical texts
    are not compared (both counted in the statistics)."""
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
