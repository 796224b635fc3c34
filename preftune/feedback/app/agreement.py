"""Inter-annotator agreement: small pure functions on plain labels.

``units`` everywhere is a mapping from an item to ``{annotator: label}``; items judged by fewer
than two annotators carry no information about agreement and are ignored. Every function returns
``None`` when there is nothing to measure (rather than a misleading 0 or 1).
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Hashable, Literal, Mapping, Sequence

Label = Hashable
Units = Mapping[Hashable, Mapping[Hashable, Label]]


def percent_agreement(units: Units) -> float | None:
    """Share of annotator pairs (over all items) that gave the same label."""
    agree = total = 0
    for labels in units.values():
        for a, b in itertools.combinations(list(labels.values()), 2):
            agree += a == b
            total += 1
    return agree / total if total else None


def cohen_kappa(a: Sequence[Label], b: Sequence[Label]) -> float | None:
    """Cohen's kappa of two annotators' labels on the same items: (p_o - p_e) / (1 - p_e)."""
    if len(a) != len(b):
        raise ValueError("cohen_kappa needs two label lists of the same length")
    n = len(a)
    if n == 0:
        return None
    p_o = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in ca) / (n * n)
    if p_e == 1.0:  # both always gave one and the same label: kappa is undefined
        return None
    return (p_o - p_e) / (1 - p_e)


def pairwise_cohen(units: Units) -> dict[tuple[Hashable, Hashable], tuple[float | None, int]]:
    """Cohen's kappa and the number of shared items for every pair of annotators."""
    shared: dict[tuple, tuple[list, list]] = {}
    for labels in units.values():
        for x, y in itertools.combinations(sorted(labels, key=str), 2):
            la, lb = shared.setdefault((x, y), ([], []))
            la.append(labels[x])
            lb.append(labels[y])
    return {pair: (cohen_kappa(la, lb), len(la)) for pair, (la, lb) in shared.items()}


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa from an items x categories matrix of how many annotators chose each category.
    Items may have different numbers of annotators (at least 2 each); p_j are pooled proportions."""
    rows = [r for r in counts if sum(r) >= 2]
    if not rows:
        return None
    total = sum(sum(r) for r in rows)
    p_j = [sum(r[j] for r in rows) / total for j in range(len(rows[0]))]
    p_i = [(sum(c * c for c in r) - sum(r)) / (sum(r) * (sum(r) - 1)) for r in rows]
    p_bar, p_e = sum(p_i) / len(rows), sum(p * p for p in p_j)
    if p_e == 1.0:
        return None
    return (p_bar - p_e) / (1 - p_e)


def fleiss_from_units(units: Units) -> float | None:
    categories = sorted({l for labels in units.values() for l in labels.values()}, key=str)
    matrix = [[Counter(labels.values())[c] for c in categories] for labels in units.values()]
    return fleiss_kappa(matrix)


def krippendorff_alpha(units: Units | Sequence[Sequence[Label]],
                       level: Literal["nominal", "ordinal", "interval"] = "nominal") -> float | None:
    """Krippendorff's alpha = 1 - D_o / D_e from the coincidence matrix. ``units`` may also be a
    list of each item's labels. Ordinal distances use the ranks of the observed values
    (Krippendorff 2011): delta(c, k) = (sum_{g=c..k} n_g - (n_c + n_k) / 2) ** 2."""
    values = [list(u.values()) if isinstance(u, Mapping) else list(u)
              for u in (units.values() if isinstance(units, Mapping) else units)]
    values = [[v for v in u if v is not None] for u in values]
    values = [u for u in values if len(u) >= 2]
    if not values:
        return None
    # Coincidences: each ordered pair of values within an item, weighted 1 / (m_u - 1).
    o: Counter = Counter()
    for u in values:
        m = len(u)
        for i, j in itertools.permutations(range(m), 2):
            o[(u[i], u[j])] += 1.0 / (m - 1)
    cats = sorted({c for pair in o for c in pair})
    n_c = {c: sum(o[(c, k)] for k in cats) for c in cats}
    n = sum(n_c.values())
    if len(cats) < 2:
        return None  # a single value everywhere: no variation to agree on

    def delta2(c, k) -> float:
        if level == "nominal":
            return 0.0 if c == k else 1.0
        if level == "interval":
            return float(c - k) ** 2
        lo, hi = sorted((cats.index(c), cats.index(k)))
        return (sum(n_c[g] for g in cats[lo:hi + 1]) - (n_c[c] + n_c[k]) / 2) ** 2

    observed = sum(o[(c, k)] * delta2(c, k) for c in cats for k in cats)
    expected = sum(n_c[c] * n_c[k] * delta2(c, k) for c in cats for k in cats) / (n - 1)
    return 1.0 - observed / expected
