"""SFT throughput on SmolLM2-135M-Instruct: tokens/s and peak memory, full fine-tuning and LoRA.

    python benchmarks/sft_throughput.py [--steps 6] [--batch-size 8] [--threads 2]

Each configuration runs in its own process (so peak memory is its own). Prints one JSON line per
configuration plus the machine's fp32 matmul GFLOP/s measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(args) -> None:
    import torch

    from benchmarks.common import matmul_gflops, peak_rss_mb
    from preftune.sft.config import SFTConfig
    from preftune.sft.trainer import train_sft

    torch.set_num_threads(args.threads)
    gflops = matmul_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        # The demo prompts with short upbeat replies: ~60 tokens a sequence with the chat template.
        rows = [json.loads(l) for l in (ROOT / "examples/demo/prompts.jsonl").read_text().splitlines()]
        data = Path(tmp) / "demos.jsonl"
        data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion":
                                            "That sounds wonderful! It is a lovely way to spend a day."}) + "\n"
                                for r in rows))
        cfg = SFTConfig(model="smollm2-135m-instruct", data=str(data), out=str(Path(tmp) / "out"),
                        max_steps=args.steps, batch_size=args.batch_size, eval_split=0, lora=args.lora,
                        lr=1e-4, threads=args.threads, packing=args.packing, max_length=512)
        train_sft(cfg, quiet=True)
        rows = [json.loads(l) for l in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows[1:]]  # the first step includes warm-up
    print(json.dumps({"bench": "sft", "model": "SmolLM2-135M-Instruct", "lora": args.lora, "packing": args.packing,
                      "batch_size": args.batch_size, "steps_measured": len(speeds),
                      "tokens_per_s": round(sum(speeds) / len(speeds), 1), "peak_rss_mb": peak_rss_mb(),
                      "matmul_gflops": gflops, "threads": args.threads}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args)
    for extra in ([], ["--lora"], ["--packing"]):
        cmd = [sys.executable, __file__, "--one", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), *extra]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
