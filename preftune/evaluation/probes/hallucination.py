"""Hallucination probe: closed-book questions with known answers.

Each reply is classified (``classify_answer``):

* **correct** -- an accepted answer occurs in the reply (``contains_answer``: after normalising
  both -- accents removed, lower-cased unless the item is ``case_sensitive``, every character that
  is not a letter or digit turned into a space -- the answer's words appear as consecutive whole
  words of the reply). A reply that hedges but names the right answer counts as correct.
* **abstained** -- otherwise, if the reply says it does not know (``ABSTAIN_PATTERNS``) or is empty.
* **wrong** -- anything else: a confident wrong answer, the hallucination.

Question file (JSONL, one a line): ``{"id", "question", "answers": [accepted variants],
"category"?, "case_sensitive"?}``. The bundled set (``preftune/resources/probes/
hallucination_questions.jsonl``) has 258 questions in six categories written for preftune.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from pathlib import Path

from preftune.data.jsonl import write_json, write_jsonl
from preftune.evaluation import report as R
from preftune.evaluation.config import HallucinationConfig
from preftune.evaluation.probes.common import before_after_table, bundled, read_items, replies, required_string, subset
from preftune.evaluation.stats import rate_with_ci
from preftune.models.loading import inference_precision, set_threads
from preftune.training.checkpoints import seed_everything

OUTCOMES = ("correct", "wrong", "abstained")
ABSTAIN_PATTERNS = [re.compile(p, re.IGNORECASE) for p in (
    r"\bi (?:do not|don't|dont) know\b",
    r"\bi(?:'m| am) (?:not sure|unsure|not certain|uncertain)\b",
    r"\b(?:no|not) (?:idea|sure)\b",
    r"\bi (?:cannot|can't|can not|am unable to|am not able to) (?:answer|say|tell|determine|recall)\b",
    r"\bi (?:do not|don't) (?:have|possess) (?:that|this|enough|the) (?:information|knowledge|data)\b",
    r"\b(?:i have no|there is no) (?:information|knowledge|way to know)\b",
    r"\bunknown to me\b",
    r"\bi (?:do not|don't) recall\b",
)]


def normalise(text: str, case_sensitive: bool = False) -> str:
    """Accents stripped, lower-cased (unless ``case_sensitive``), non-alphanumerics as single spaces."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    if not case_sensitive:
        text = text.lower()
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


def contains_answer(reply: str, answers: list[str], case_sensitive: bool = False) -> bool:
    padded = f" {normalise(reply, case_sensitive)} "
    return any(f" {normalise(a, case_sensitive)} " in padded for a in answers if normalise(a, case_sensitive))


def is_abstention(reply: str) -> bool:
    return not reply.strip() or any(p.search(reply) for p in ABSTAIN_PATTERNS)


def classify_answer(reply: str, answers: list[str], case_sensitive: bool = False) -> str:
    """``correct``, ``abstained`` or ``wrong`` (see module docstring)."""
    if contains_answer(reply, answers, case_sensitive):
        return "correct"
    if is_abstention(reply):
        return "abstained"
    return "wrong"


def parse_question(obj: dict) -> dict:
    answers = obj.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and normalise(a) for a in answers):
        raise ValueError('"answers" must be a non-empty list of non-empty strings (accepted variants)')
    case_sensitive = obj.get("case_sensitive", False)
    if not isinstance(case_sensitive, bool):
        raise ValueError('"case_sensitive" must be true or false')
    item = {"question": required_string(obj, "question"), "answers": answers,
            "category": str(obj.get("category") or "all"), "case_sensitive": case_sensitive}
    if obj.get("id") is not None:
        item["id"] = obj["id"]
    return item


def summarise(labels: list[str], categories: list[str]) -> dict:
    """``n``, ``rates`` (each outcome's rate with a Wilson interval) and ``by_category``."""
    by_cat = defaultdict(list)
    for label, cat in zip(labels, categories):
        by_cat[cat].append(label)
    return {"n": len(labels), "rates": {o: rate_with_ci([l == o for l in labels]) for o in OUTCOMES},
            "by_category": {c: {"n": len(ls), **{o: rate_with_ci([l == o for l in ls]) for o in OUTCOMES}}
                            for c, ls in sorted(by_cat.items())}}


def run_hallucination_probe(cfg: HallucinationConfig, quiet: bool = False) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    source = cfg.questions or str(bundled("hallucination_questions.jsonl"))
    items = subset(read_items(source, parse_question), cfg.samples, cfg.seed)
    prompts = [[{"role": "user", "content": cfg.instruction.replace("{question}", q["question"])}] for q in items]
    result = {"probe": "hallucination", "questions": cfg.questions or "bundled", "model": cfg.model,
              "precision": inference_precision(cfg.dtype, cfg.device)}
    rows = []
    for role, path in (("model", cfg.model), ("baseline", cfg.baseline)):
        if not path:
            continue
        texts = replies(path, prompts, cfg, f"hallucination probe ({role})", quiet)
        labels = [classify_answer(t, q["answers"], q["case_sensitive"]) for t, q in zip(texts, items)]
        summary = summarise(labels, [q["category"] for q in items])
        if role == "model":
            result.update(summary)
        else:
            result["baseline"] = {"model": path, **summary}
        rows += [{"id": q["id"], "model": role, "category": q["category"], "question": q["question"],
                  "answers": q["answers"], "reply": t, "label": l} for q, t, l in zip(items, texts, labels)]
    write_json(out / "probe.json", result)
    write_jsonl(out / "answers.jsonl", rows)
    (out / "report.html").write_text(R.page("preftune probe hallucination", hallucination_section(result, rows)),
                                     encoding="utf-8")
    return result


def hallucination_section(result: dict, rows: list[dict] = (), max_examples: int = 15) -> str:
    """Report section: before/after rates, per-category rates and example hallucinations."""
    before = result.get("baseline")
    parts = [R.paragraph(f"{result['n']} closed-book questions ({result.get('questions')}); model "
                         f"{result.get('model')}" + (f", baseline {before['model']}" if before else "")),
             before_after_table(result, before, list(OUTCOMES))]
    cat_rows = [[R.esc(c), str(v["n"])] + [R.fmt_rate(v[o]) for o in OUTCOMES]
                for c, v in result["by_category"].items()]
    parts.append(R.table(["category", "n", *OUTCOMES], cat_rows, raw=True))
    wrong = [r for r in rows if r["model"] == "model" and r["label"] == "wrong"][:max_examples]
    if wrong:
        parts.append(R.paragraph("Examples of wrong (hallucinated) answers:"))
        parts.append(R.table(["question", "accepted", "reply"],
                             [[R.esc(r["question"]), R.esc(" / ".join(r["answers"])), R.sample_text(r["reply"])]
                              for r in wrong], raw=True))
    parts.append(R.paragraph("correct: an accepted answer variant appears as whole words in the normalised "
                             "reply; abstained: an explicit \"I don't know\"-style reply; wrong: anything "
                             "else. 95 % Wilson intervals.", note=True))
    return R.section("Hallucination probe", *parts)
