"""Scorers: every ``(prompts, responses) -> scores`` function, named by one grammar
(``preftune.scoring.grammar``) and built from reward models, the built-ins
(``preftune.scoring.builtin``) and user functions."""

from preftune.scoring.grammar import Scorer, Term, load_scorer, parse_scorer, scorer_from_function, single_reward_model

__all__ = ["Scorer", "Term", "load_scorer", "parse_scorer", "scorer_from_function", "single_reward_model"]
