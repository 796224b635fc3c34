"""Data-parallel throughput on CPU: 1 process x 2 threads against torchrun 2 processes x 1 thread.

    python benchmarks/distributed_throughput.py [--steps 5] [--global-batch 16] [--hidden 256] [--layers 4]

SFT, reward-model training and PPO run on a randomly initialised Llama (``--hidden`` wide,
``--layers`` deep, the tiny test tokenizer's vocabulary of ~500 tokens, so the transformer blocks
rather than the vocabulary dominate the compute), each stage at the same global batch in both
layouts: one process with ``--batch-size G --threads 2``, and ``torchrun --nproc_per_node 2`` with
``--batch-size G/2 --threads 1`` (gloo). Throughput is read from the run's own metrics (rank 0),
the first step excluded as warm-up: SFT and reward tokens/s (global tokens of the step over its
wall time), PPO episodes/s. Process start-up and model loading are not included.

A third layout, 1 process x 1 thread, gives the scaling of data parallelism alone (2 ranks against
1, one thread each); on a machine shared with other jobs it is also the fairer baseline, since an
op split over 2 threads waits for whichever thread the scheduler delayed, while 2 one-thread
processes only meet at the gradient all-reduce. The machine's fp32 matmul GFLOP/s at 1 and 2
threads is measured first, in the same run.

Every run (and this script) sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is set: with OpenMP's
default spinning, a 2-thread process on a machine where other jobs keep the cores busy stalls on
every op (a 16 x 256 by 256 x 256 matmul took 16 ms instead of 50 us), which would measure the
contention rather than the layouts. Idle threads then sleep instead of spinning, which costs a few
microseconds per op on a quiet machine.

Before the stages, the cost of PPO's per-row sampling streams (``generate(row_seeds=...)``, which data
parallelism needs so a prompt's sample does not depend on its rank) against one shared generator:
a rollout's generation time on the benchmark model, and one sampling step on a SmolLM2-sized
vocabulary (49,152 logits per row).

Prints one JSON line per measurement and a table with the ratios 2 processes / 1 process per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool (see above)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REWARD = '''
def e_count(prompts, responses):
    return [r.count("e") / 10 for r in responses]
'''


def prepare(tmp: Path, args) -> dict[str, Path]:
    """The model, the demonstrations, synthetic comparisons, the prompts and a reward function."""
    from preftune.models.tiny import save_tiny

    demos = [json.loads(line) for line in (ROOT / "preftune/resources/quick/demos.jsonl").read_text().splitlines()]
    texts = [d.get("prompt", "") + " " + d.get("completion", "") for d in demos]
    model = save_tiny(tmp / "model", texts, hidden_size=args.hidden, layers=args.layers, heads=4)
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "examples/demo/prompts.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    words = " ".join(texts).split()
    reply = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(8, 24)))  # noqa: E731
    (tmp / "prefs.jsonl").write_text("".join(json.dumps({"prompt": p, "chosen": reply(), "rejected": reply()}) + "\n"
                                             for p in prompts[:256]))
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[:256]))
    (tmp / "reward.py").write_text(REWARD)
    return {"model": model, "demos": ROOT / "preftune/resources/quick/demos.jsonl", "prefs": tmp / "prefs.jsonl",
            "prompts": tmp / "prompts.jsonl", "reward": tmp / "reward.py"}


def stage_args(stage: str, files: dict[str, Path], steps: int) -> list[str]:
    if stage == "sft":
        return ["sft", "--model", str(files["model"]), "--data", str(files["demos"]), "--eval-split", "0",
                "--max-steps", str(steps), "--lr", "1e-4"]
    if stage == "reward":
        return ["reward", "--model", str(files["model"]), "--data", str(files["prefs"]), "--eval-split", "0",
                "--max-steps", str(steps), "--normalize-samples", "16", "--device", "cpu"]
    return ["ppo", "--policy", str(files["model"]), "--reward", f"{files['reward']}:e_count",
            "--prompts", str(files["prompts"]), "--steps", str(steps), "--response-length", "16",
            "--temperature", "1.0", "--samples", "0"]


def run_stage(stage: str, files: dict[str, Path], tmp: Path, procs: int, threads: int, global_batch: int,
              steps: int) -> dict:
    out = tmp / f"{stage}-{procs}x{threads}"
    args = stage_args(stage, files, steps) + [
        "--out", str(out), "--batch-size", str(global_batch // procs), "--threads", str(threads), "--seed", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if procs == 1:
        cmd = [sys.executable, "-m", "preftune", *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={procs}",
               "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "preftune", *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{stage} with {procs} process(es) failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # warm-up out
    key, unit = ("eps", "episodes/s") if stage == "ppo" else ("tokens_per_s", "tokens/s")
    return {"stage": stage, "processes": procs, "threads_per_process": threads, "batch_per_process":
            global_batch // procs, "global_batch": global_batch, "steps_measured": len(rows),
            "throughput": round(statistics.mean(r[key] for r in rows), 1), "unit": unit,
            "wall_s_with_startup": round(wall, 1)}


def sampling_cost(files: dict[str, Path], batch: int, repeats: int = 3) -> dict:
    """Generation time of one rollout batch with a shared generator and with per-row streams, on
    the benchmark model (2 threads); then one sampling step on SmolLM2-sized logits."""
    import torch

    from preftune.data.chat import encode_prompt
    from preftune.models.generation import generate, row_seed, sample_next
    from preftune.models.loading import load_causal_lm

    torch.set_num_threads(2)
    model, tok = load_causal_lm(files["model"], device="cpu")
    lines = files["prompts"].read_text().splitlines()[:batch]
    prompts = [encode_prompt(tok, [{"role": "user", "content": json.loads(line)["prompt"]}]) for line in lines]

    def timed(**kw) -> float:  # median of the repeats after one warm-up; always 16 new tokens
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            generate(model, tok, prompts, max_new_tokens=16, temperature=1.0, min_new_tokens=16,
                     return_logprobs=True, **kw)
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:])

    shared = timed(generator=torch.Generator().manual_seed(0))
    per_row = timed(row_seeds=[row_seed(0, 0, i) for i in range(len(prompts))])
    logits = torch.randn(batch, 49_152)
    uniforms = torch.rand(batch, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)

    def step_us(**kw) -> float:
        t = time.perf_counter()
        for _ in range(50):
            sample_next(logits, 1.0, 1.0, 0, **kw)
        return (time.perf_counter() - t) / 50 * 1e6

    return {"measure": "sampling", "batch": batch, "new_tokens": 16,
            "generation_s_shared_generator": round(shared, 4), "generation_s_per_row_streams": round(per_row, 4),
            "ratio": round(per_row / shared, 3),
            "step_us_vocab_49152_shared_generator": round(step_us(generator=g), 1),
            "step_us_vocab_49152_per_row_streams": round(step_us(generator=None, uniforms=uniforms), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="optimiser (PPO: rollout) steps per run, the first "
                                                             "excluded as warm-up")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--stages", default="sft,reward,ppo")
    args = parser.parse_args()
    import torch

    from benchmarks.common import matmul_gflops

    probe = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        probe[f"matmul_gflops_{threads}_threads"] = matmul_gflops(n=1024, iters=5, repeats=3)
    print(json.dumps({"measure": "machine", **probe, "load_average_1min": os.getloadavg()[0]}), flush=True)
    layouts = [(1, 2), (2, 1), (1, 1)]  # (processes, threads per process)
    with tempfile.TemporaryDirectory() as tmp:
        files = prepare(Path(tmp), args)
        print(json.dumps(sampling_cost(files, args.global_batch)), flush=True)
        table = []
        for stage in args.stages.split(","):
            runs = []
            for procs, threads in layouts:
                runs.append(run_stage(stage, files, Path(tmp), procs, threads, args.global_batch, args.steps))
                print(json.dumps(runs[-1]), flush=True)
            table.append((stage, *runs))
    print("\n| stage | unit | 1 process x 2 threads | 2 processes x 1 thread | 1 process x 1 thread | "
          "2-proc / 1-proc (2 threads) | 2-proc / 1-proc (1 thread) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for stage, one, two, single in table:
        print(f"| {stage} | {one['unit']} | {one['throughput']} | {two['throughput']} | {single['throughput']} | "
              f"{two['throughput'] / one['throughput']:.2f} | {two['throughput'] / single['throughput']:.2f} |")


if __name__ == "__main__":
    main()
