"""PPO throughput on the peer workload (see ../shared/bench/peers/README.md), next to TRL's PPO.

Workload: the 64 fixed prompts, 16 episodes per rollout step, 32 new tokens, temperature 0.7,
4 PPO epochs x 2 mini-batches, KL coefficient 0.05, fp32 (or --dtypes), 2 threads, 1 warm-up step then N
measured steps, the peer models (TINY: random 4-layer Llama with SmolLM2's vocabulary; SMOL:
SmolLM2-135M-Instruct) with their sequence-classification reward models.

Configurations:
  identical -- TRL 1.12 PPO's settings: full fine-tuning, lr 1e-5, a separate frozen reference,
               a separate value model initialised from the reward model, no gradient clipping;
  defaults  -- preftune's defaults on the same workload: LoRA r=16 on all projections (lr 1e-4),
               reference = adapters disabled, value head on the policy trunk.

Each (model, configuration) runs in its own process so peak RSS is its own. Printed per run:
episodes/s, seconds per phase, peak RSS, this machine's fp32 matmul GFLOP/s measured in the same
process, and the update phase's achieved GFLOP/s (matrix FLOPs of the linear layers and of the LM
head at response positions, forward + backward; full fine-tuning counts backward as 2x forward,
LoRA as 1x since no frozen-weight gradients are formed) as a share of that matmul peak.

    python benchmarks/ppo_throughput.py --models tiny,smol135 --configs identical,defaults --steps 3 --peer
    python benchmarks/ppo_throughput.py --models smol135 --dtypes fp32,bf16 --steps 2 --peer --peer-dtypes fp32,bf16
    python benchmarks/ppo_throughput.py --learning --models smol135 --steps 12   # reward curves, VADER reward
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import matmul_gflops, peak_rss_mb  # noqa: E402

PEERS = Path(os.environ.get("PEER_BENCH_DIR", ROOT.parent / "shared" / "bench" / "peers"))
PEER_MODELS = Path(os.environ.get("PEER_MODELS", "/tmp/peer-models"))
PEER_PYTHON = os.environ.get("PEER_PYTHON", "/tmp/peer-trl112/bin/python")

WORKLOAD = dict(batch_size=16, response_length=32, temperature=0.7, top_p=1.0, ppo_epochs=4, mini_batches=2,
                kl_coef=0.05, max_length=512, threads=2, seed=42, schedule="constant")
CONFIGS = {
    "identical": dict(lora=False, lr=1e-5, max_grad_norm=0.0, value_model="RM"),
    "defaults": dict(),
}


def peer_reward_model(directory: Path):
    """The peer's reward model (a plain sequence-classification directory, no normalisation) scored
    by preftune's RewardModel: chat rendering of (prompt, response) as text, last real token."""
    from preftune.models.reward_model import RewardModel, _load_seq_cls

    return RewardModel(*_load_seq_cls(directory, "cpu", "fp32")).score


def vader_positive(prompts, responses):
    """Programmatic reward for the learning comparison: VADER compound sentiment of the reply."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = vader_positive.__dict__.setdefault("analyzer", SentimentIntensityAnalyzer())
    return [analyzer.polarity_scores(r)["compound"] for r in responses]


def update_flops(model_dir: Path, cfg, prompt_tokens: float, response_tokens: float) -> float:
    """Matrix FLOPs of one step's update phase (see the module docstring)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir / "policy")
    H, I, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = H // c.num_attention_heads * c.num_key_value_heads
    trunk = L * (2 * H * H + 2 * H * kv + 3 * H * I)  # q, o, k, v and the gated MLP
    tokens = prompt_tokens + response_tokens
    forward = 2 * trunk * tokens + 2 * H * V * response_tokens
    if cfg.value_model != "head":
        forward += 2 * trunk * tokens  # the separate value model's trunk
    backward = forward * (1 if cfg.lora else 2)
    return (forward + backward) * cfg.batch_size * cfg.ppo_epochs


def run_one(model: str, config: str, steps: int, learning: bool, dtype: str = "fp32", engine: str = "auto") -> dict:
    import torch

    from preftune.data.chat import encode_prompt
    from preftune.models.loading import load_tokenizer
    from preftune.rl.config import PPOConfig
    from preftune.rl.trainer import train_rl

    torch.set_num_threads(2)
    mm = matmul_gflops()
    d = PEER_MODELS / model
    overrides = dict(CONFIGS[config])
    if overrides.get("value_model") == "RM":
        overrides["value_model"] = str(d / "rm")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PPOConfig(policy=str(d / "policy"), reward=f"rm:{d / 'rm'}", prompts=str(PEERS / "prompts.jsonl"),
                        out=str(Path(tmp) / "out"), steps=1 + steps, dtype=dtype, engine=engine, **WORKLOAD,
                        **overrides)
        reward = vader_positive if learning else peer_reward_model(d / "rm")
        train_rl(cfg, reward_fn=reward, quiet=True)
        rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    measured = rows[1:]
    total = sum(r["time/step"] for r in measured)
    phase = lambda k: round(sum(r.get(f"time/{k}", 0.0) for r in measured) / len(measured), 2)
    tok = load_tokenizer(d / "policy")
    prompts = [json.loads(line)["prompt"] for line in (PEERS / "prompts.jsonl").read_text().splitlines()]
    prompt_tokens = statistics.mean(len(encode_prompt(tok, [{"role": "user", "content": p}])) for p in prompts)
    response_tokens = statistics.mean(r["response_length_mean"] for r in measured)
    flops = update_flops(d, cfg, prompt_tokens, response_tokens)
    update_gflops = flops / phase("update") / 1e9
    return {"system": "preftune-ppo", "config": config, "model": model, "dtype": dtype, "engine": engine,
            "steps": steps,
            "episodes_per_s": round(cfg.batch_size * len(measured) / total, 3), "s_per_step": round(total / len(measured), 2),
            "peak_rss_mb": peak_rss_mb(), "matmul_gflops": mm,
            "phases_s": {k: phase(k) for k in ("generation", "scoring", "old_and_reference", "update", "sync")},
            "sampler_logprob_gap": round(statistics.mean(r["policy/sampler_logprob_gap"] for r in measured), 5),
            "update_gflops": round(update_gflops, 1), "update_share_of_matmul": round(update_gflops / mm, 3),
            "response_length_mean": round(response_tokens, 2), "prompt_tokens_mean": round(prompt_tokens, 2),
            "lora": cfg.lora, "value_model": "head" if cfg.value_model == "head" else "separate (from RM)",
            "scores": [round(r["objective/scores"], 4) for r in rows], "kl": [round(r["objective/kl"], 3) for r in rows]}


def peer_script(dtype: str, workdir: Path) -> Path:
    """The peer's PPO script; for bf16 a copy of the harness with TRL's own switch turned on
    (``bf16=True``; ``use_cpu=True`` because transformers refuses bf16 without an accelerator otherwise)."""
    if dtype == "fp32":
        return PEERS / "run_trl_ppo.py"
    copy = workdir / "peers"
    shutil.copytree(PEERS, copy)
    script = copy / "run_trl_ppo.py"
    text = script.read_text()
    if "bf16=False," not in text:
        raise SystemExit(f"{script}: no 'bf16=False,' to switch on")
    script.write_text(text.replace("bf16=False,", "bf16=True, use_cpu=True,", 1))
    return script


def run_peer(model: str, steps: int, dtype: str = "fp32") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PEER_RESULT_FILE": ""}
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.run([PEER_PYTHON, str(peer_script(dtype, Path(workdir))), model, str(steps)], env=env,
                              capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"system": "trl-ppo", "model": model, "dtype": dtype,
                "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return {**json.loads(lines[-1][len("RESULT "):]), "dtype": dtype}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smol135")
    p.add_argument("--configs", default="identical,defaults")
    p.add_argument("--steps", type=int, default=3, help="measured rollout steps after 1 warm-up step")
    p.add_argument("--dtypes", default="fp32", help="preftune's precision(s), comma-separated: fp32, bf16 "
                                                     "(mixed: fp32 master weights, bf16 autocast)")
    p.add_argument("--engines", default="auto", help="preftune's rollout engine(s), comma-separated: auto, hf, vllm")
    p.add_argument("--peer", action="store_true", help="also run TRL 1.12 PPO from the peer harness, back to back")
    p.add_argument("--peer-dtypes", default="fp32", help="the peer's precision(s): fp32, bf16 (TRL's bf16=True)")
    p.add_argument("--learning", action="store_true", help="VADER sentiment reward instead of the RM: reward curves")
    p.add_argument("--one", nargs=3, metavar=("MODEL", "CONFIG", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        model, config, dtype = args.one
        print("RESULT " + json.dumps(run_one(model, config, args.steps, args.learning, dtype, args.engines)),
              flush=True)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    for model in args.models.split(","):
        if args.peer and not args.learning:
            for dtype in args.peer_dtypes.split(","):
                print(json.dumps(run_peer(model, args.steps, dtype)), flush=True)
        for config in args.configs.split(","):
            for dtype in args.dtypes.split(","):
                for engine in args.engines.split(","):
                    cmd = [sys.executable, __file__, "--one", model, config, dtype, "--steps", str(args.steps),
                           "--engines", engine] + (["--learning"] if args.learning else [])
                    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                    if proc.returncode or not lines:
                        print(json.dumps({"config": config, "model": model, "dtype": dtype, "engine": engine,
                                          "rc": proc.returncode, "error": proc.stderr.strip()[-2000:]}), flush=True)
                    else:
                        print(lines[-1][len("RESULT "):], flush=True)


if __name__ == "__main__":
    main()
