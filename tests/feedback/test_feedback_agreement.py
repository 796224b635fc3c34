"""Agreement statistics against textbook values computed by hand."""

from __future__ import annotations

import pytest

from preftune.feedback.app.agreement import (
    cohen_kappa,
    fleiss_from_units,
    fleiss_kappa,
    krippendorff_alpha,
    pairwise_cohen,
    percent_agreement,
)


def test_cohen_kappa_two_by_two_example():
    # 50 items: both yes 20, A yes/B no 5, A no/B yes 10, both no 15.
    # p_o = 35/50 = 0.7; p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = (0.7-0.5)/(1-0.5) = 0.4
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_cohen_kappa_perfect_chance_and_undefined():
    assert cohen_kappa([1, 2, 1, 2], [1, 2, 1, 2]) == pytest.approx(1.0)
    # p_o = 0.5, p_e = 0.5 -> 0
    assert cohen_kappa(["x", "x", "y", "y"], ["x", "y", "x", "y"]) == pytest.approx(0.0)
    assert cohen_kappa(["x", "x"], ["x", "x"]) is None  # p_e = 1
    assert cohen_kappa([], []) is None
    with pytest.raises(ValueError):
        cohen_kappa([1], [1, 2])


# Fleiss (1971) as worked in the literature: 10 items, 14 raters, 5 categories.
FLEISS = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
          [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]


def test_fleiss_kappa_textbook_example():
    # P-bar = 0.378, P-e = 0.213 -> kappa = 0.210
    assert fleiss_kappa(FLEISS) == pytest.approx(0.20993, abs=1e-5)


def test_fleiss_kappa_small_hand_example():
    # 3 items x 2 raters: (a,a), (a,b), (b,b). P_i = 1, 0, 1 -> P-bar = 2/3; p_a = p_b = 0.5 -> P-e = 0.5
    # kappa = (2/3 - 1/2) / (1/2) = 1/3
    assert fleiss_kappa([[2, 0], [1, 1], [0, 2]]) == pytest.approx(1 / 3)
    units = {1: {"u": "a", "v": "a"}, 2: {"u": "a", "v": "b"}, 3: {"u": "b", "v": "b"}, 4: {"u": "a"}}
    assert fleiss_from_units(units) == pytest.approx(1 / 3)  # the single-rater item is ignored


# Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 observers, 12 units, gaps.
N = None
KRIPP = [[1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
         [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
         [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
         [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N]]


@pytest.mark.parametrize("level,expected", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_krippendorff_alpha_textbook_example(level, expected):
    units = [[row[i] for row in KRIPP] for i in range(12)]
    assert krippendorff_alpha(units, level) == pytest.approx(expected, abs=5e-4)


def test_krippendorff_alpha_small_hand_example():
    # Units (1,1), (1,2), (2,2): coincidences o11 = 2, o12 = o21 = 1, o22 = 2; n1 = n2 = 3, n = 6.
    # Nominal: D_o = 2, D_e = 2*3*3/5 = 3.6 -> alpha = 1 - 5*2/18 = 4/9.
    assert krippendorff_alpha([[1, 1], [1, 2], [2, 2]]) == pytest.approx(4 / 9)
    assert krippendorff_alpha([[1, 1], [2, 2]]) == pytest.approx(1.0)
    assert krippendorff_alpha([[1, 1], [1, 1]]) is None  # no variation
    assert krippendorff_alpha([[1], [2]]) is None  # nobody overlaps


def test_ordinal_alpha_punishes_far_disagreements_more():
    near = [[1, 2], [2, 2], [3, 3], [1, 1], [3, 3]]
    far = [[1, 3], [2, 2], [3, 3], [1, 1], [3, 3]]
    assert krippendorff_alpha(near, "ordinal") > krippendorff_alpha(far, "ordinal")
    # Nominal alpha counts a near miss as a full disagreement.
    assert krippendorff_alpha(near, "ordinal") > krippendorff_alpha(near, "nominal")


def test_percent_agreement_over_annotator_pairs():
    units = {1: {"a": "x", "b": "x", "c": "y"},  # pairs: ab agree, ac no, bc no
             2: {"a": "y", "b": "y"},             # ab agree
             3: {"a": "x"}}                       # no pairs
    assert percent_agreement(units) == pytest.approx(2 / 4)
    assert percent_agreement({1: {"a": "x"}}) is None


def test_pairwise_cohen_uses_shared_items_only():
    units = {1: {"a": "x", "b": "x"}, 2: {"a": "y", "b": "y"}, 3: {"a": "x", "c": "y"}, 4: {"b": "x", "c": "x"}}
    result = pairwise_cohen(units)
    assert result[("a", "b")] == (pytest.approx(1.0), 2)
    assert result[("a", "c")] == (pytest.approx(0.0), 1)  # one item, x vs y: p_o = 0, p_e = 0
    assert set(result) == {("a", "b"), ("a", "c"), ("b", "c")}
