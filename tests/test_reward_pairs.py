"""Expansion of comparisons, rankings and ratings into groups of pairs."""

from preftune.data.records import Comparison, Ranking, Rating
from preftune.reward.pairs import expand_preferences, group_by_prompt, ranking_pairs, rating_pairs

MSG = [{"role": "user", "content": "q"}]


def test_ranking_pairs_without_ties_is_all_c_k_2():
    pairs, ties = ranking_pairs([[2], [0], [3], [1]])
    assert pairs == [(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)]
    assert ties == 0


def test_ranking_pairs_skip_ties():
    pairs, ties = ranking_pairs([[2], [0, 1], [3]])
    assert pairs == [(2, 0), (2, 1), (2, 3), (0, 3), (1, 3)]
    assert ties == 1


def test_rating_pairs():
    pairs, ties = rating_pairs([3, 1, 3, 2])
    assert pairs == [(0, 1), (0, 3), (2, 1), (3, 1), (2, 3)]
    assert ties == 1


def test_expand_mixed_records_and_counts():
    records = [
        Comparison(MSG, "good", "bad", strength=2.0),
        Ranking(MSG, ["a", "b", "c"], [[1], [0, 2]], annotator="ann1"),
        Rating(MSG, "x", 3, annotator="ann2"),
        Rating(MSG, "y", 1, annotator="ann2"),
        Rating(MSG, "z", 1, annotator="ann2"),
        Rating(MSG, "lonely", 2, annotator="ann3"),
        Rating([{"role": "user", "content": "other"}], "w", 2, annotator="ann2"),
    ]
    exp = expand_preferences(records, margin_scale=0.5)
    comparison, ranking, rated = exp.groups
    assert (comparison.pairs[0].winner, comparison.pairs[0].loser, comparison.pairs[0].margin) == (0, 1, 1.0)
    assert [(p.winner, p.loser) for p in ranking.pairs] == [(1, 0), (1, 2)]
    assert ranking.annotator == "ann1"
    assert rated.responses == ["x", "y", "z"]
    assert [(p.winner, p.loser) for p in rated.pairs] == [(0, 1), (0, 2)]
    c = exp.counts
    assert (c["comparisons"], c["rankings"], c["ratings"], c["pairs"]) == (1, 1, 5, 5)
    assert c["tied_pairs_skipped"] == 2  # one in the ranking, y-z in the ratings
    assert c["single_rating_prompts"] == 2  # "lonely" (its own annotator) and "other"
    assert "5 pairs in 3 groups" in exp.summary()


def test_ratings_on_different_scales_compare_by_position():
    exp = expand_preferences([Rating(MSG, "a", 2, scale=3), Rating(MSG, "b", 4, scale=7)])
    assert exp.counts["tied_pairs_skipped"] == 1  # 2/3 and 4/7 both sit at the middle
    assert exp.groups == []


def test_identical_texts_in_a_ranking_are_skipped():
    exp = expand_preferences([Ranking(MSG, ["same", "same", "other"], [[0], [1], [2]])])
    assert [(p.winner, p.loser) for p in exp.groups[0].pairs] == [(0, 2), (1, 2)]
    assert exp.counts["identical_pairs_skipped"] == 1


def test_no_margin_without_strength():
    exp = expand_preferences([Comparison(MSG, "a", "b")], margin_scale=3.0)
    assert exp.groups[0].pairs[0].margin == 0.0


def test_group_by_prompt_merges_a_prompts_comparisons_and_keeps_every_pair():
    other = [{"role": "user", "content": "other"}]
    records = [
        Comparison(MSG, "a", "b", annotator="ann1"),
        Comparison(other, "x", "y", annotator="ann1"),
        Comparison(MSG, "c", "a", annotator="ann1", strength=2.0),
        Comparison(MSG, "b", "a", annotator="ann2"),  # disagrees with the first: both pairs stay
        Ranking(MSG, ["c", "d"], [[1], [0]], annotator="ann2"),
        Comparison(MSG, "e", "f"),  # same prompt, no shared response: stays its own group
    ]
    groups = group_by_prompt(expand_preferences(records).groups)
    assert len(groups) == 3
    first, second, third = groups
    assert first.responses == ["a", "b", "c", "d"]  # each distinct text once, in order of appearance
    assert [(p.winner, p.loser, p.margin, p.annotator) for p in first.pairs] == [
        (0, 1, 0.0, "ann1"), (2, 0, 2.0, "ann1"), (1, 0, 0.0, "ann2"), (3, 2, 0.0, "ann2")]
    assert first.annotator is None  # two annotators contributed
    assert second.responses == ["x", "y"] and second.annotator == "ann1"
    assert third.responses == ["e", "f"] and len(third.pairs) == 1


def test_group_by_prompt_merges_transitively():
    records = [Comparison(MSG, "a", "b"), Comparison(MSG, "c", "d"), Comparison(MSG, "b", "c")]
    (group,) = group_by_prompt(expand_preferences(records).groups)
    assert group.responses == ["a", "b", "c", "d"]
    assert [(p.winner, p.loser) for p in group.pairs] == [(0, 1), (2, 3), (1, 2)]


def test_group_by_prompt_keeps_splits_apart():
    records = [Comparison(MSG, "a", "b", split="train"), Comparison(MSG, "a", "c", split="eval")]  # shares "a"
    groups = group_by_prompt(expand_preferences(records).groups)
    assert [(g.split, g.responses) for g in groups] == [("train", ["a", "b"]), ("eval", ["a", "c"])]
