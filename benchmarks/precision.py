"""fp32 against bf16 mixed precision on SmolLM2-135M-Instruct, back to back in one run.

Each measurement runs in its own process, fp32 first, then bf16 (``--dtype bf16``: fp32 master
weights and optimiser state, forward passes under bf16 autocast, frozen weights stored in bf16):

  sft       the main job's SFT (LoRA r=16, lr 4e-4, 3 epochs over the demo demonstrations, batch 8):
            tokens/s and the held-out loss it reaches; and full fine-tuning tokens/s (a few steps)
  reward    reward-model training tokens/s on a SmolLM2 backbone (full fine-tuning and LoRA) and on
            all-MiniLM-L6-v2 (an encoder: preftune keeps encoders in fp32, so both rows are fp32)
  generate  tokens/s of `preftune sample` (the hf engine), 64 demo prompts, 48 new tokens, batch 64
  ppo       seconds per step on the peer workload (benchmarks/ppo_throughput.py: TRL's settings and
            preftune's defaults), optionally next to TRL 1.12 PPO (--peer)

    python benchmarks/precision.py                      # everything but PPO (about 15 minutes)
    python benchmarks/precision.py --only ppo --peer    # PPO, preftune in both precisions and TRL

Prints one JSON line per measurement and, at the end, the bf16 / fp32 ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DTYPES = ("fp32", "bf16")
DEMO = ROOT / "examples" / "demo"


def sft(dtype: str, lora: bool, steps: int) -> dict:
    from preftune.sft.config import SFTConfig
    from preftune.sft.trainer import train_sft

    with tempfile.TemporaryDirectory() as tmp:
        if lora:  # the main job's [sft] table
            cfg = SFTConfig(model="smollm2-135m-instruct", data=str(DEMO / "demos.jsonl"), out=str(Path(tmp) / "o"),
                            lora=True, lora_r=16, lr=4e-4, epochs=3, batch_size=8, max_length=256, eval_split=0.1,
                            seed=0, threads=2, dtype=dtype)
        else:
            cfg = SFTConfig(model="smollm2-135m-instruct", data=str(DEMO / "demos.jsonl"), out=str(Path(tmp) / "o"),
                            max_steps=steps, batch_size=8, lr=1e-5, max_length=256, eval_split=0, seed=0,
                            threads=2, dtype=dtype)
        summary = train_sft(cfg, quiet=True)
        rows = [json.loads(line) for line in (Path(tmp) / "o" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows[1:]]  # the first step includes warm-up
    return {"tokens_per_s": round(sum(speeds) / len(speeds), 1), "steps": len(rows),
            "eval_loss": summary.get("eval_loss"), "initial_eval_loss": summary.get("initial_eval_loss")}


def reward(dtype: str, backbone: str, steps: int) -> dict:
    from preftune.models.loading import bundled_minilm_path
    from preftune.reward.config import RewardConfig
    from preftune.reward.trainer import train_reward

    model = str(bundled_minilm_path("the benchmark")) if backbone == "minilm" else "smollm2-135m-instruct"
    prompts = [json.loads(line)["prompt"] for line in (DEMO / "prompts.jsonl").read_text().splitlines()]
    rows = [{"prompt": p, "chosen": "What a lovely question! Here is a short, happy answer.",
             "rejected": "I do not know and I do not care about this at all."} for p in prompts[:128]]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prefs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = RewardConfig(model=model, data=str(data), out=str(Path(tmp) / "rm"), max_steps=steps, batch_size=8,
                           lr=1e-4, eval_split=0, max_length=128, seed=0, threads=2, lora=backbone == "smollm2-lora",
                           dtype=dtype)
        train_reward(cfg, quiet=True)
        metrics = [json.loads(line) for line in (Path(tmp) / "rm" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in metrics[1:]]
    return {"tokens_per_s": round(sum(speeds) / len(speeds), 1), "steps": len(metrics)}


def generate(dtype: str) -> dict:
    from preftune.sampling.config import SampleConfig
    from preftune.sampling.sample import sample_candidates

    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        lines = (DEMO / "prompts.jsonl").read_text().splitlines()[:64]
        prompts.write_text("\n".join(lines) + "\n")
        cfg = SampleConfig(model=["smollm2-135m-instruct"], prompts=str(prompts), out=str(Path(tmp) / "c.jsonl"),
                           n=1, max_new_tokens=48, temperature=0.7, batch_size=64, threads=2, dtype=dtype)
        sample_candidates(cfg, quiet=True)  # warm-up: model conversion, caches
        summary = sample_candidates(cfg, quiet=True)
    return {"tokens_per_s": round(summary["tokens_per_s"], 1), "tokens": summary["tokens"]}


TASKS = {
    "sft-lora": lambda d, s: sft(d, lora=True, steps=s),
    "sft-full": lambda d, s: sft(d, lora=False, steps=s),
    "reward-smollm2-full": lambda d, s: reward(d, "smollm2-full", s),
    "reward-smollm2-lora": lambda d, s: reward(d, "smollm2-lora", s),
    "reward-minilm": lambda d, s: reward(d, "minilm", s),
    "generate": lambda d, s: generate(d),
}


def one(task: str, dtype: str, steps: int) -> None:
    import torch

    from benchmarks.common import matmul_gflops, peak_rss_mb

    torch.set_num_threads(2)
    gflops = matmul_gflops()
    t = time.perf_counter()
    result = TASKS[task](dtype, steps)
    print("RESULT " + json.dumps({"task": task, "dtype": dtype, **result, "seconds": round(time.perf_counter() - t, 1),
                                  "peak_rss_mb": peak_rss_mb(), "matmul_gflops": gflops}), flush=True)


def subprocess_result(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false",
                               "HF_HUB_OFFLINE": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"cmd": " ".join(cmd[2:]), "error": proc.stderr.strip()[-1500:]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(TASKS), help=f"comma-separated: {', '.join(TASKS)}, ppo")
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps of the speed-only runs")
    parser.add_argument("--peer", action="store_true", help="ppo: also TRL 1.12 PPO from the peer harness")
    parser.add_argument("--one", nargs=2, metavar=("TASK", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(*args.one, args.steps)
    results = []
    for task in args.only.split(","):
        if task == "ppo":
            cmd = [sys.executable, str(ROOT / "benchmarks" / "ppo_throughput.py"), "--models", "smol135",
                   "--configs", "identical,defaults", "--dtypes", ",".join(DTYPES), "--steps", "2"]
            subprocess.run(cmd + (["--peer"] if args.peer else []), check=True)
            continue
        for dtype in DTYPES:
            result = subprocess_result([sys.executable, __file__, "--one", task, dtype, "--steps", str(args.steps)])
            print(json.dumps(result), flush=True)
            results.append(result)
    by = {(r.get("task"), r.get("dtype")): r for r in results}
    for task in dict.fromkeys(r.get("task") for r in results if "task" in r):
        fp32, bf16 = by.get((task, "fp32")), by.get((task, "bf16"))
        if fp32 and bf16:
            print(f"{task}: bf16 / fp32 tokens/s = {bf16['tokens_per_s'] / fp32['tokens_per_s']:.2f}"
                  + (f"; held-out loss fp32 {fp32['eval_loss']:.4f}, bf16 {bf16['eval_loss']:.4f}"
                     if fp32.get("eval_loss") is not None else ""), flush=True)


if __name__ == "__main__":
    main()
