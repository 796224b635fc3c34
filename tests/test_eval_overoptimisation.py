"""Over-optimisation on purpose: PPO without a KL penalty against a flawed proxy.

The gold reward wants up to three of the letter "e" (more cost) and dislikes "!"; the proxy wants
every "e" and pays ten times as much for the spurious "!". A tiny policy trained on the proxy with
no KL leash first gains gold reward, then stuffs its responses with "e" or trades it for "!" (which
of the two depends on the CPU's kernels): the proxy keeps rising, the gold falls, the monitor fires
and the report shows it.
"""

import json
from pathlib import Path

from preftune.evaluation.gao import overoptimisation_section
from preftune.rl.config import PPOConfig
from preftune.rl.trainer import train_rl
from preftune.training.monitor import overoptimisation_alert
from tests.conftest import write_lines

REWARDS = '''
def gold(prompts, responses):  # a few e's are good, a response stuffed with them is not
    return [float(min(r.count("e"), 3) - max(r.count("e") - 3, 0)) - r.count("!") for r in responses]

def flawed_proxy(prompts, responses):
    return [float(r.count("e")) + 10.0 * r.count("!") for r in responses]
'''
TOPICS = ["movie", "film", "day", "food", "book", "song", "city", "dog"]


def test_flawed_proxy_without_kl_is_over_optimised_and_the_monitor_fires(tiny_model_dir, tmp_path):
    (tmp_path / "rewards.py").write_text(REWARDS)
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about the {t}."} for t in TOPICS])
    held = write_lines(tmp_path / "held.jsonl", [{"prompt": f"Tell me about the {t}."} for t in
                                                ("sea", "sky", "tree", "car")])
    cfg = PPOConfig(policy=str(tiny_model_dir), reward=f"{tmp_path}/rewards.py:flawed_proxy",
                        gold=f"{tmp_path}/rewards.py:gold", prompts=str(prompts), eval_prompts=str(held),
                        out=str(tmp_path / "out"), steps=30, eval_every=3, batch_size=8, response_length=8,
                        temperature=1.0, lora=False, lr=3e-3, threads=1, kl_coef=0.0)
    train_rl(cfg, quiet=True)
    rows = [json.loads(l) for l in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("eval/gold") is not None]
    gold = [r["eval/gold"] for r in evals]
    proxy = [r["eval/proxy"] for r in evals]
    assert proxy[-1] > proxy[0] + 5  # the proxy is optimised ...
    assert max(gold) > gold[0] and gold[-1] < max(gold)  # ... gold rises, then falls
    # 30 %: the 4 held-out prompts make single evaluations noisy; the real fall is larger.
    alert = overoptimisation_alert(evals, drop_fraction=0.3)
    assert alert is not None and alert.proxy > alert.proxy_at_best
    best = json.loads((Path(cfg.out) / "best" / "preftune_best.json").read_text())
    assert best["eval/gold"] == max(gold) == alert.best_gold  # the kept checkpoint is the gold peak
    html = overoptimisation_section(evals, drop_fraction=0.3)
    assert "over-optimisation: gold reward" in html and "data:image/png;base64," in html


def test_an_ensembles_disagreement_is_reported_next_to_proxy_and_gold():
    rows = [{"step": s, "eval/kl": 0.5 * s, "eval/proxy": 0.1 * s, "eval/gold": 0.3, "eval/proxy_uncertainty": u}
            for s, u in ((2, 0.125), (4, 0.25), (6, 0.5))]
    html = overoptimisation_section(rows)
    assert "disagreement" in html and "0.125" in html and "0.5" in html
    assert "disagreement" not in overoptimisation_section([{k: v for k, v in r.items() if "uncertainty" not in k}
                                                           for r in rows])
