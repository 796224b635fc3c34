"""RLOO and GRPO throughput on the peer workload (../shared/bench/peers/README.md), next to TRL 1.16's.

Workload (the peer harness's run_trl_rloo.py): the 64 fixed prompts, 16 episodes per rollout step as
4 prompts x 4 samples, 32 new tokens at temperature 0.7, 4 clipped passes (TRL's num_iterations) x 2
mini-batches of 8, beta 0.05, 2 threads, 1 warm-up step then N measured steps, the peer models (TINY,
SMOL = SmolLM2-135M-Instruct) and their sequence-classification reward models.

Configurations of preftune:
  identical -- TRL's settings: full fine-tuning at lr 1e-5, a separate frozen reference, fp32, gradient
               clipping at 1.0; RLOO: k1 KL in the sequence reward, the response as one action; GRPO:
               k3 KL in the loss, loss type dapo, group-scaled rewards (TRL 1.16's defaults);
  defaults  -- preftune's defaults on the same workload: LoRA r=16 (lr 1e-4), reference = adapters
               disabled, --dtype auto (bf16 mixed on a CPU with avx512_bf16).

TRL's peer forces 32 tokens (min_new_tokens); preftune stops at EOS, so its mean response length is
printed next to its speed. Each run in its own process (peak RSS is its own).

    python benchmarks/critic_free_throughput.py --models smol135 --methods rloo,grpo --steps 2 --peer
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import matmul_gflops, peak_rss_mb  # noqa: E402
from benchmarks.ppo_throughput import PEER_MODELS, PEERS, peer_reward_model  # noqa: E402

PEER_PYTHON = os.environ.get("PEER_PYTHON_TRL116", "/tmp/peer-trl116/bin/python")
WORKLOAD = dict(batch_size=16, samples_per_prompt=4, response_length=32, temperature=0.7, top_p=1.0, ppo_epochs=4,
                mini_batches=2, kl_coef=0.05, max_length=512, threads=2, seed=42, schedule="constant",
                warmup_ratio=0.0)
CONFIGS = {"identical": dict(lora=False, lr=1e-5, dtype="fp32", max_grad_norm=1.0), "defaults": dict(lora=True)}


def run_one(model: str, method: str, config: str, steps: int) -> dict:
    import torch

    from preftune.rl.config import ALGORITHMS
    from preftune.rl.trainer import train_rl

    torch.set_num_threads(2)
    mm = matmul_gflops()
    d = PEER_MODELS / model
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ALGORITHMS[method](policy=str(d / "policy"), reward=f"rm:{d / 'rm'}",
                                 prompts=str(PEERS / "prompts.jsonl"), out=str(Path(tmp) / "out"), steps=1 + steps,
                                 **WORKLOAD, **CONFIGS[config])
        train_rl(cfg, reward_fn=peer_reward_model(d / "rm"), quiet=True)
        rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
        precision = json.loads((Path(cfg.out) / "run_config.json").read_text())["precision"]
    measured = rows[1:]
    total = sum(r["time/step"] for r in measured)
    phase = lambda k: round(sum(r.get(f"time/{k}", 0.0) for r in measured) / len(measured), 2)  # noqa: E731
    return {"system": f"preftune-{method}", "config": config, "model": model, "precision": precision,
            "steps": steps,
            "episodes_per_s": round(cfg.batch_size * len(measured) / total, 3),
            "s_per_step": round(total / len(measured), 2), "peak_rss_mb": peak_rss_mb(), "matmul_gflops": mm,
            "phases_s": {k: phase(k) for k in ("generation", "scoring", "old_and_reference", "update")},
            "response_length_mean": round(statistics.mean(r["response_length_mean"] for r in measured), 2),
            "scores": [round(r["objective/scores"], 4) for r in rows],
            "kl": [round(r["objective/kl"], 3) for r in rows]}


def run_peer(model: str, method: str, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PEER_RESULT_FILE": ""}
    proc = subprocess.run([PEER_PYTHON, str(PEERS / "run_trl_rloo.py"), method, model, str(steps)], env=env,
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"system": f"trl-{method}", "model": model, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smol135")
    p.add_argument("--methods", default="rloo,grpo")
    p.add_argument("--configs", default="identical,defaults")
    p.add_argument("--steps", type=int, default=2, help="measured rollout steps after 1 warm-up step")
    p.add_argument("--peer", action="store_true", help="also run TRL 1.16 from the peer harness, right before ours")
    p.add_argument("--one", nargs=3, metavar=("MODEL", "METHOD", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(*args.one, args.steps)), flush=True)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    results = []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            if args.peer:
                results.append(run_peer(model, method, args.steps))
                print(json.dumps(results[-1]), flush=True)
            for config in args.configs.split(","):
                proc = subprocess.run([sys.executable, __file__, "--one", model, method, config, "--steps",
                                       str(args.steps)], env=env, capture_output=True, text=True)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                results.append(json.loads(lines[-1][len("RESULT "):]) if lines and not proc.returncode else
                               {"system": f"preftune-{method}", "config": config, "model": model,
                                "error": proc.stderr.strip()[-2000:]})
                print(json.dumps(results[-1]), flush=True)
    for r in results:  # ratios against the TRL run of the same model and method
        peer = next((q for q in results if q.get("system", "").startswith("trl") and q["model"] == r["model"]
                     and q["system"].endswith(r["system"].split("-")[-1]) and "error" not in q), None)
        if peer and "config" in r and "error" not in r:
            print(f"{r['model']} {r['system']} {r['config']}: {r['episodes_per_s'] / peer['episodes_per_s']:.2f}x "
                  f"TRL's episodes/s, {r['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x its peak RSS")


if __name__ == "__main__":
    main()
