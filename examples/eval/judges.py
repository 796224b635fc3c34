"""Example judges for `preftune eval` / `preftune bon` (reward spec `examples/eval/judges.py:NAME`).

`sentiment` is an easily gamed proxy (VADER compound: upbeat words score high whatever the
question). `gold` wants more than one thing -- a pleasant tone, but also staying on the prompt's
topic and not padding the answer -- so a policy that only chases `sentiment` drifts away from it.
"""

from __future__ import annotations

import re

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

_vader = SentimentIntensityAnalyzer()
_WORD = re.compile(r"[a-z']+")
_STOP = set("a an the is are was were be to of and or in on at for with what how why who which do does "
            "you your i me my it this that please tell write give short about".split())


def sentiment(prompts, responses):
    return [_vader.polarity_scores(r)["compound"] for r in responses]


def _topic_overlap(prompt: str, response: str) -> float:
    want = {w for w in _WORD.findall(prompt.lower()) if w not in _STOP}
    got = set(_WORD.findall(response.lower()))
    return len(want & got) / len(want) if want else 0.0


def gold(prompts, responses):
    out = []
    for p, r in zip(prompts, responses):
        words = len(r.split())
        tone = _vader.polarity_scores(r)["compound"]
        out.append(0.3 * tone + _topic_overlap(p, r) - 0.01 * max(0, words - 30) - 0.1 * r.count("!"))
    return out
