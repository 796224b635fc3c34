"""``preftune bon``: best-of-n sampling against a reward model, gold and proxy reward against KL.

For every prompt the policy samples ``max(n)`` responses once; the proxy (the reward being
optimised) and, when given, a gold judge score all of them. For each n the expected proxy and
gold reward of the response best-of-n would pick is computed over all size-n subsets
(``gao.best_of_n_expectation``), and plotted against ``d = sqrt(KL_bon(n))`` with
``KL_bon(n) = log n - (n - 1) / n``. Giving a PPO run's ``metrics.jsonl`` puts both methods on one
plot. Output: ``OUT/bon.json``, ``OUT/samples.jsonl``, ``OUT/report.html``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from preftune.data.jsonl import read_dicts, write_json, write_jsonl
from preftune.data.records import prompt_text
from preftune.errors import PreftuneError
from preftune.evaluation import report as R
from preftune.evaluation.config import BonConfig
from preftune.evaluation.evaluate import prompt_subset
from preftune.evaluation.gao import best_of_n_expectation, bon_kl, fit_gao, overoptimisation_section
from preftune.evaluation.harness import score_all
from preftune.evaluation.judges import is_human
from preftune.evaluation.stats import bootstrap_mean_ci
from preftune.models.engines import open_engine
from preftune.models.generation import SamplingOptions, sample_responses
from preftune.models.loading import inference_precision, set_threads
from preftune.scoring import load_scorer
from preftune.training.checkpoints import seed_everything


def bon_curve(proxy: np.ndarray, gold: np.ndarray | None, ns: list[int], *, seed: int,
              resamples: int) -> list[dict]:
    """Per n: mean over prompts of the best-of-n proxy (and gold) reward, with bootstrap intervals.

    ``proxy``/``gold`` are [prompts, max(n)] score matrices."""
    rows = []
    for n in ns:
        p = [best_of_n_expectation(proxy[i], proxy[i], n) for i in range(proxy.shape[0])]
        row = {"n": n, "kl": bon_kl(n), "sqrt_kl": math.sqrt(bon_kl(n)), "proxy": float(np.mean(p)),
               "proxy_ci": list(bootstrap_mean_ci(p, seed=seed, resamples=resamples)), "gold": None,
               "gold_ci": None}
        if gold is not None:
            g = [best_of_n_expectation(proxy[i], gold[i], n) for i in range(proxy.shape[0])]
            row.update({"gold": float(np.mean(g)), "gold_ci": list(bootstrap_mean_ci(g, seed=seed,
                                                                                     resamples=resamples))})
        rows.append(row)
    return rows


def run_bon(cfg: BonConfig, quiet: bool = False) -> dict:
    for spec in (cfg.reward, cfg.gold):
        if spec and is_human(spec):
            raise PreftuneError("preftune bon needs scoring judges; human:PROJECT works with preftune eval")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    records = prompt_subset(cfg)
    proxy_fn = load_scorer(cfg.reward, cfg.device, cfg.dtype)  # resolved before sampling: bad specs fail fast
    gold_fn = load_scorer(cfg.gold, cfg.device, cfg.dtype) if cfg.gold else None
    N = max(cfg.n)
    messages = [r.messages for r in records for _ in range(N)]
    sampler = open_engine(cfg.engine, cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, quiet=quiet)
    options = SamplingOptions(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size)
    samples = sample_responses(sampler, messages, options, generator=torch.Generator().manual_seed(cfg.seed),
                               description=f"sampling {N} per prompt", quiet=quiet)
    sampler.close()
    proxy = np.array(score_all(proxy_fn, messages, samples.texts, cfg.batch_size, "scoring: proxy", quiet))
    gold = (np.array(score_all(gold_fn, messages, samples.texts, cfg.batch_size, "scoring: gold", quiet))
            if gold_fn else None)
    shape = (len(records), N)
    rows = bon_curve(proxy.reshape(shape), None if gold is None else gold.reshape(shape), cfg.n,
                     seed=cfg.seed, resamples=cfg.bootstrap)
    fit = None
    if gold is not None:
        try:
            fit = fit_gao([r["sqrt_kl"] for r in rows], [r["gold"] for r in rows], "bon").to_json()
        except ValueError:  # too few n to fit (e.g. --n 1,2): the rows alone
            pass
    result = {"model": cfg.model, "reward": cfg.reward, "gold": cfg.gold, "prompts": cfg.prompts,
              "precision": inference_precision(cfg.dtype, cfg.device),
              "n_prompts": len(records), "samples_per_prompt": N, "results": rows, "gold_fit": fit}
    write_json(out / "bon.json", result)
    write_jsonl(out / "samples.jsonl", [
        {"prompt_index": k // N, "prompt": prompt_text(messages[k]), "response": samples.texts[k],
         "proxy": float(proxy[k]), "gold": None if gold is None else float(gold[k])}
        for k in range(len(messages))])
    ppo_rows = read_dicts(cfg.ppo_metrics) if cfg.ppo_metrics else []
    table = R.table(["n", "KL bound (nats)", "sqrt KL", "proxy [95 % CI]", "gold [95 % CI]"],
                    [[r["n"], R.fmt(r["kl"]), R.fmt(r["sqrt_kl"]), f"{R.fmt(r['proxy'])} {R.fmt_ci(r['proxy_ci'])}",
                      f"{R.fmt(r['gold'])} {R.fmt_ci(r['gold_ci'])}"] for r in rows], raw=True)
    html = R.page("preftune bon", R.section("Best-of-n", R.paragraph(
        f"{cfg.model}: {len(records)} prompts x {N} samples, picked by {cfg.reward}"
        + (f", gold {cfg.gold}" if cfg.gold else "")), table), overoptimisation_section(ppo_rows, rows))
    (out / "report.html").write_text(html, encoding="utf-8")
    return result

