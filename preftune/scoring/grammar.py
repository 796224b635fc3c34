"""The one scorer grammar: a string that says where a score of (prompt, response) comes from.

A *scorer* is a function ``(prompts, responses) -> one float per response``: the reward PPO
optimises (``--reward``), the gold it is checked against (``--gold``), an evaluation's judge
(``--judge``) and the simulated annotators' preference (``--labeler``, the main job's ``gold``).
Every one of those flags reads the same expression::

    scorer := term ("+" term)*             spaces around "+" and "*" are optional
    term   := [WEIGHT "*"] atom            WEIGHT: a number, e.g. 0.5, -1, 1e-3
    atom   := NAME | NAME(ARGS)            a built-in scorer (``preftune.scoring.builtin``):
                                           sentiment, length(max=50), keyword(a|b), similarity,
                                           ends, nonrepetitive, or a combination such as helpful
            | labeler:TERM                 the same built-ins, in the older spelling
            | rm:DIR | DIR                 a reward model written by ``preftune reward``
            | python:MODULE:FUNCTION | MODULE:FUNCTION | FILE.py:FUNCTION
                                           your function (prompts: list[str], responses: list[str])
                                           -> floats; prompts arrive as the last user turn's text
            | (scorer)                     grouping: 0.5*(sentiment + ends)

``*`` binds tighter than ``+``: ``0.5*sentiment + ends`` weighs only sentiment. A name that is a
built-in is the built-in even when a directory of that name exists (write ``rm:NAME`` for the
directory). Reward models receive the prompts as given (messages), so they render their own chat
template.

``load_scorer`` returns a ``Scorer``: called with (prompts, responses) it gives a float32 tensor
[N] on the CPU, and a wrong count or a non-finite value is a ``PreftuneError`` naming the scorer.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from preftune.data.records import Messages, prompt_text
from preftune.errors import PreftuneError
from preftune.models.reward_ensemble import AGGREGATIONS, is_ensemble
from preftune.scoring.builtin import BUILTINS, NAMED, NEEDS_DEVICE, POSITIONAL

Prompt = Messages | str
WEIGHT = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*")
BUILTIN_CALL = re.compile(r"([a-z_]+)(?:\((.*)\))?", re.DOTALL)
FILE_FUNCTION = re.compile(r"[^:]+\.py:\w+")
MODULE_FUNCTION = re.compile(r"[\w.]+:\w+")


@dataclass(frozen=True)
class Term:
    """One weighted part of a scorer expression."""

    weight: float
    kind: Literal["builtin", "reward_model", "function"]
    target: str  # the built-in's name, the reward model's directory, or module:function / file.py:function
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def atom(self) -> str:
        """The term without its weight, as an expression (``length(max=50)``, ``rm:DIR``, ``uwo(DIR,0.5)``)."""
        if self.kind == "reward_model" and "aggregate" in self.args:
            coef = f",{self.args['coef']:g}" if self.args["aggregate"] == "uwo" else ""
            return f"{self.args['aggregate']}({self.target}{coef})"
        args = ",".join(f"{k}={v}" for k, v in self.args.items())
        return {"builtin": self.target + (f"({args})" if args else ""), "reward_model": f"rm:{self.target}",
                "function": self.target}[self.kind]

    def describe(self) -> str:
        return self.atom if self.weight == 1.0 else f"{self.weight:g}*{self.atom}"


# ---------------------------------------------------------------- parsing


def parse_scorer(spec: str) -> list[Term]:
    """The weighted terms of a scorer expression, named combinations expanded and weights
    multiplied out (``0.5*helpful`` -> four built-ins). Raises ``PreftuneError`` naming the part
    it cannot read."""
    text = spec.strip()
    if not text:
        raise PreftuneError("empty scorer (expected e.g. sentiment, rm:DIR or 0.5*A + B)")
    terms, end = _parse_sum(text, 0, spec)
    if end != len(text):
        raise PreftuneError(f"scorer {spec!r}: unexpected {text[end:]!r} at character {end + 1}")
    return terms


def _skip_spaces(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _parse_sum(text: str, pos: int, spec: str) -> tuple[list[Term], int]:
    terms: list[Term] = []
    while True:
        more, pos = _parse_term(text, pos, spec)
        terms += more
        pos = _skip_spaces(text, pos)
        if pos < len(text) and text[pos] == "+":
            pos += 1
            continue
        return terms, pos


def _parse_term(text: str, pos: int, spec: str) -> tuple[list[Term], int]:
    weight = 1.0
    while (m := WEIGHT.match(text, pos)) is not None:
        weight *= float(m.group(1))
        pos = m.end()
    if not math.isfinite(weight):
        raise PreftuneError(f"scorer {spec!r}: weights must be finite")
    pos = _skip_spaces(text, pos)
    if text.startswith("(", pos):
        inner, pos = _parse_sum(text, pos + 1, spec)
        pos = _skip_spaces(text, pos)
        if not text.startswith(")", pos):
            raise PreftuneError(f"scorer {spec!r}: missing ')'")
        return _scaled(inner, weight), pos + 1
    if text.startswith("labeler:", pos):
        inner, pos = _parse_term(text, pos + len("labeler:"), spec)
        return _scaled(inner, weight), pos
    start, depth = pos, 0
    while pos < len(text):
        ch = text[pos]
        if depth == 0 and ch in "+)":
            break
        depth += (ch == "(") - (ch == ")")
        pos += 1
    atom = text[start:pos].strip()
    if not atom:
        raise PreftuneError(f"scorer {spec!r}: a term is missing at character {start + 1}")
    return _scaled(_atom(atom, spec), weight), pos


def _scaled(terms: list[Term], weight: float) -> list[Term]:
    return [Term(weight * t.weight, t.kind, t.target, t.args) for t in terms]


def _atom(atom: str, spec: str) -> list[Term]:
    if atom.startswith("rm:"):
        return [Term(1.0, "reward_model", atom[3:].strip())]
    if atom.startswith("python:"):
        target = atom[len("python:"):].strip()
        if not MODULE_FUNCTION.fullmatch(target):
            raise PreftuneError(f"scorer {atom!r}: expected python:module:function")
        return [Term(1.0, "function", target)]
    if FILE_FUNCTION.fullmatch(atom):
        return [Term(1.0, "function", atom)]
    call = BUILTIN_CALL.fullmatch(atom)
    if call and call.group(1) in AGGREGATIONS:
        return [_ensemble_term(call.group(1), call.group(2) or "", spec)]
    if call and (call.group(1) in BUILTINS or call.group(1) in NAMED):
        return _builtin(call.group(1), call.group(2), spec)
    if MODULE_FUNCTION.fullmatch(atom):
        return [Term(1.0, "function", atom)]
    if Path(atom).is_dir():
        return [Term(1.0, "reward_model", atom)]
    known = ", ".join(sorted(BUILTINS) + sorted(NAMED))
    what = "no such reward-model directory; " if ("/" in atom or atom.startswith(".")) else ""
    raise PreftuneError(f"unknown scorer {atom!r} in {spec!r} ({what}built-ins: {known}; or rm:DIR, "
                        f"python:module:function, module:function, file.py:function)")


def _ensemble_term(how: str, args: str, spec: str) -> Term:
    """``mean(DIR)``, ``wco(DIR)``, ``uwo(DIR, COEF)`` (or ``coef=COEF``): an ensemble's aggregation."""
    parts = [a.strip() for a in _split_top_level(args, ",")] if args.strip() else []
    if not parts or not parts[0]:
        raise PreftuneError(f"scorer {spec!r}: {how}(DIR{', COEF' if how == 'uwo' else ''}) needs the ensemble's "
                            f"directory")
    target = parts[0].removeprefix("rm:")
    rest = [p.removeprefix("coef=").strip() for p in parts[1:]]
    if how != "uwo":
        if rest:
            raise PreftuneError(f"scorer {spec!r}: {how} takes only the ensemble's directory")
        return Term(1.0, "reward_model", target, {"aggregate": how})
    coef = _value(rest[0]) if len(rest) == 1 else None
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not coef >= 0 or coef == float("inf"):
        raise PreftuneError(f"scorer {spec!r}: uwo(DIR, COEF) needs one coefficient COEF >= 0 "
                            f"(the reward is mean - COEF * variance over members)")
    return Term(1.0, "reward_model", target, {"aggregate": "uwo", "coef": float(coef)})


def _builtin(name: str, args: str | None, spec: str) -> list[Term]:
    if name in NAMED:
        if args:
            raise PreftuneError(f"scorer {spec!r}: {name} takes no arguments")
        return parse_scorer(NAMED[name])
    if args is not None and not _balanced(args):  # keyword(a|b)(c): "a|b)(c" is no argument list
        raise PreftuneError(f"scorer {spec!r}: unbalanced parentheses in {name}({args})")
    kwargs: dict[str, Any] = {}
    for arg in _split_top_level(args, ",") if args else []:
        key, eq, value = arg.partition("=")
        if not eq:
            if name not in POSITIONAL:
                raise PreftuneError(f"scorer {spec!r}: {name} takes no positional argument")
            key, value = POSITIONAL[name], arg
        if key.strip() in kwargs:
            raise PreftuneError(f"scorer {spec!r}: {name} is given {key.strip()} twice")
        kwargs[key.strip()] = _value(value.strip())
    return [Term(1.0, "builtin", name, kwargs)]


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            return False
    return depth == 0


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
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def single_reward_model(spec: str) -> str | None:
    """The directory when ``spec`` is exactly one reward model with weight 1, else None."""
    terms = parse_scorer(spec)
    if len(terms) == 1 and terms[0].kind == "reward_model" and terms[0].weight == 1.0 and not terms[0].args \
            and not is_ensemble(terms[0].target):
        return terms[0].target
    return None


# ---------------------------------------------------------------- loading


@dataclass
class Scored:
    """What a scorer part may return instead of bare scores: the scores and, for an ensemble, each
    response's uncertainty (the members' standard deviation)."""

    scores: torch.Tensor
    uncertainty: torch.Tensor


class Scorer:
    """A named, checked ``(prompts, responses) -> float32 tensor [N]`` function (CPU).
    ``last_uncertainty``: the members' disagreement on each response of the last call when the
    scorer holds an ensemble (weighted as its term is), else None."""

    def __init__(self, name: str, fn: Callable[[Sequence[Prompt], Sequence[str]], Any]) -> None:
        self.name, self._fn = name, fn
        self.last_uncertainty: torch.Tensor | None = None

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        values = self._fn(prompts, responses)
        self.last_uncertainty = None
        if isinstance(values, Scored):
            values, self.last_uncertainty = values.scores, values.uncertainty.float().cpu()
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu()
        scores = torch.as_tensor(values, dtype=torch.float32).flatten()
        if scores.numel() != len(responses):
            raise PreftuneError(f"scorer {self.name} returned {scores.numel()} scores for {len(responses)} responses")
        bad = (~torch.isfinite(scores)).nonzero().flatten()
        if bad.numel():
            i = int(bad[0])
            raise PreftuneError(f"scorer {self.name} returned {scores[i].item()} for response {i} "
                                f"({len(bad)} non-finite in the batch)")
        return scores

    def __repr__(self) -> str:
        return f"Scorer({self.name!r})"


def load_scorer(spec: str, device: str | None = None, dtype: str | None = None) -> Scorer:
    """The ``Scorer`` of an expression (see the module docstring). Every part is loaded now, so a
    bad name or a missing file fails before any sampling. ``device`` and ``dtype`` (``--dtype``) are
    where and how reward models and encoders run."""
    terms = parse_scorer(spec)
    parts = [(t.weight, _load_term(t, device, dtype)) for t in terms]
    name = spec.strip()
    if len(parts) == 1 and parts[0][0] == 1.0:
        return Scorer(name, parts[0][1])

    def weighted_sum(prompts, responses) -> torch.Tensor | Scored:
        total = torch.zeros(len(responses), dtype=torch.float64)
        spread = None
        for weight, fn in parts:
            values = fn(prompts, responses)
            if isinstance(values, Scored):  # ensembles' spreads add up, scaled by their weights
                spread = (0.0 if spread is None else spread) + abs(weight) * values.uncertainty.double()
                values = values.scores
            if isinstance(values, torch.Tensor):
                values = values.detach().cpu()
            total += weight * torch.as_tensor(values, dtype=torch.float64)
        return total if spread is None else Scored(total, spread)

    return Scorer(name, weighted_sum)


def scorer_from_function(name: str, fn: Callable[[list[str], list[str]], Any]) -> Scorer:
    """A ``Scorer`` around a Python function of (prompt texts, responses), e.g. passed to a trainer."""
    return Scorer(name, _on_prompt_text(fn))


def _load_term(term: Term, device: str | None, dtype: str | None) -> Callable:
    if term.kind == "reward_model":
        if is_ensemble(term.target):
            return _ensemble_scorer(term, device, dtype)
        if "aggregate" in term.args:
            raise PreftuneError(f"scorer {term.atom!r}: {term.target} is not an ensemble (no ensemble.json; "
                                f"`preftune reward --ensemble K` writes one)")
        from preftune.models.reward_model import RewardModel

        return RewardModel.load(term.target, device=device, dtype=dtype).score
    if term.kind == "function":
        return _on_prompt_text(load_function(term.target))
    kwargs = {"device": device, **term.args} if term.target in NEEDS_DEVICE else term.args
    try:
        return _on_prompt_text(BUILTINS[term.target](**kwargs))
    except TypeError as e:
        raise PreftuneError(f"scorer {term.describe()!r}: bad arguments for {term.target}: {e}") from None


def _ensemble_scorer(term: Term, device: str | None, dtype: str | None) -> Callable:
    """An ensemble's aggregation (``rm:DIR`` on an ensemble: the mean), with the members' spread."""
    from preftune.models.reward_ensemble import RewardEnsemble, aggregate, member_std

    ensemble = RewardEnsemble.load(term.target, device=device, dtype=dtype)
    how, coef = term.args.get("aggregate", "mean"), term.args.get("coef", 0.0)

    def score(prompts, responses) -> Scored:
        members = ensemble.member_scores(prompts, responses)
        return Scored(aggregate(members, how, coef), member_std(members))

    return score


def _on_prompt_text(fn: Callable) -> Callable:
    """Give ``fn`` the prompts as text (the last user turn), as built-ins and user functions take them."""
    return lambda prompts, responses: fn([p if isinstance(p, str) else prompt_text(p) for p in prompts],
                                         list(responses))


def load_function(target: str) -> Callable:
    """``module:function`` or ``path/to/file.py:function``."""
    module_name, _, func_name = target.rpartition(":")
    if not module_name or not func_name:
        raise PreftuneError(f"scorer function {target!r}: expected module:function or file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.exists():
                raise PreftuneError(f"scorer function {target!r}: no such file {path}")
            spec = importlib.util.spec_from_file_location(f"preftune_user_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise PreftuneError(f"scorer function {target!r}: cannot import {module_name}: {e}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise PreftuneError(f"scorer function {target!r}: {module_name} has no function {func_name}")
    return func
