"""The two generation engines back to back: preftune's own loop (hf) and vLLM, on SmolLM2-135M-Instruct.

  generate  tokens/s at batch 16, 64 and 256 (the first B demo prompts, chat template, 48 new
            tokens, temperature 0.7), fp32 and bf16; each (engine, precision) in its own process,
            after one warm-up batch; the engine's load time apart. vLLM takes each batch as one
            request list (it schedules them itself); hf samples the B prompts as one batch.
  ppo       seconds per PPO step on the peer workload with each engine (benchmarks/ppo_throughput.py,
            preftune's defaults: LoRA, bf16), with the weight-sync phase apart
  main-job  the main job (`preftune run --config examples/demo/demo.toml`) with each engine: stage
            times (opt-in: about 10 minutes per engine)
  variants  the vLLM settings preftune chose against (opt-in, about 10 minutes), each in its own
            process, at batch 64 (and 256): eager against compiled (load time, tokens/s), and an
            online trainer's LoRA update pushed merged (reload_weights) against as a vLLM adapter
            (push seconds, tokens/s sampling with it)

    python benchmarks/engine_throughput.py                           # generate and ppo
    python benchmarks/engine_throughput.py --only generate --dtypes bf16
    python benchmarks/engine_throughput.py --only main-job
    python benchmarks/engine_throughput.py --only variants --dtypes fp32

Needs vLLM in the same environment (`make vllm`). Prints one JSON line per measurement and the
vLLM / hf ratios at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "examples" / "demo"
BATCHES = (16, 64, 256)
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def demo_prompts(n: int) -> list[str]:
    """The first ``n`` demo prompts."""
    return [json.loads(line)["prompt"] for line in (DEMO / "prompts.jsonl").read_text().splitlines()][:n]


def generate(engine_name: str, dtype: str, batches: list[int]) -> list[dict]:
    """tokens/s of one engine at each batch size (run in its own process)."""
    import torch

    from preftune.data.chat import encode_prompt
    from preftune.models.engines import open_engine

    torch.set_num_threads(2)
    prompts = demo_prompts(max(batches))
    t = time.perf_counter()
    engine = open_engine(engine_name, "smollm2-135m-instruct", device="cpu", dtype=dtype, seed=0, max_model_len=512,
                         quiet=True)
    load_s = time.perf_counter() - t
    encoded = [encode_prompt(engine.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    options = dict(max_new_tokens=48, temperature=0.7, generator=torch.Generator().manual_seed(0))
    engine.generate(encoded[:8], **options)  # warm-up
    rows = []
    for batch in batches:
        t = time.perf_counter()
        gen = engine.generate(encoded[:batch], **options)
        seconds = time.perf_counter() - t
        tokens = int(gen.response_mask.sum())
        rows.append({"task": "generate", "engine": engine_name, "dtype": dtype, "batch": batch, "tokens": tokens,
                     "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                     "ended_share": round(gen.ended.float().mean().item(), 3), "load_s": round(load_s, 1)})
    return rows


def variant(name: str, dtype: str) -> list[dict]:
    """vLLM at batch 64 (and 256 for the compile variants) with one setting changed (own process)."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from preftune.data.chat import encode_prompt
    from preftune.models.engines import VLLMEngine
    from preftune.models.loading import load_causal_lm, resolve_model_path
    from preftune.training.lora import apply_lora

    torch.set_num_threads(2)
    path = str(resolve_model_path("smollm2-135m-instruct"))
    model, tokenizer = load_causal_lm(path, dtype="fp32")
    encoded = [TokensPrompt(prompt_token_ids=encode_prompt(tokenizer, [{"role": "user", "content": p}]))
               for p in demo_prompts(256)]
    t = time.perf_counter()
    engine = None
    if name in ("eager", "merged"):  # preftune's own engine, as the stages run it
        engine = VLLMEngine(path, tokenizer, precision=dtype, device=torch.device("cpu"), seed=0, max_model_len=512)
        llm = engine.llm
    else:  # the same options, one changed
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        llm = LLM(model=path, tokenizer=path, dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype], seed=0,
                  max_model_len=512, enforce_eager=name != "compiled", gpu_memory_utilization=0.9,
                  enable_chunked_prefill=False, **(dict(enable_lora=True, max_lora_rank=16) if name == "lora" else {}))
    load_s = time.perf_counter() - t

    def tokens_per_s(n: int, lora=None) -> float:
        params = [SamplingParams(temperature=0.7, max_tokens=48, seed=i) for i in range(n)]
        t = time.perf_counter()
        out = llm.generate(encoded[:n], params, use_tqdm=False, lora_request=lora)
        return round(sum(len(o.outputs[0].token_ids) for o in out) / (time.perf_counter() - t), 1)

    row = {"task": "variant", "variant": name, "dtype": dtype, "load_s": round(load_s, 1)}
    if name in ("eager", "compiled"):
        tokens_per_s(8)  # warm-up
        return [{**row, "batch": b, "tokens_per_s": tokens_per_s(b)} for b in (64, 256)]
    model = apply_lora(model, 16, 32, 0.0, ["all-linear"], "CAUSAL_LM")  # preftune's default adapter
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for update in range(4):  # the first is a warm-up
            with torch.no_grad():  # an update moves the adapters
                for pname, p in model.named_parameters():
                    if "lora_B" in pname:
                        p.normal_(0, 0.01)
            t = time.perf_counter()
            lora = None
            if name == "lora":
                model.save_pretrained(f"{tmp}/{update}")
                lora = LoRARequest(f"policy-{update}", update + 1, f"{tmp}/{update}")
            else:
                engine.sync(model)
            push_s = time.perf_counter() - t
            speed = tokens_per_s(64 if update else 8, lora)
            if update:
                rows.append({**row, "batch": 64, "update": update, "push_s": round(push_s, 2), "tokens_per_s": speed})
    return rows


def run(cmd: list[str]) -> list[dict]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    # "RESULT {...}" from this script's own --one runs; one JSON object per line from ppo_throughput.py
    # (a failed ppo_throughput run prints its own row with its "error")
    rows = [json.loads(line.removeprefix("RESULT ")) for line in proc.stdout.splitlines()
            if line.startswith(("RESULT {", "{"))]
    if proc.returncode or not rows:
        return [{"cmd": " ".join(cmd[1:]), "error": proc.stderr.strip()[-1500:]}]
    return rows


def main_job(engine: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "preftune", "run", "--config", str(DEMO / "demo.toml"),
                               "--out", tmp, "--engine", engine], capture_output=True, text=True, env=ENV, cwd=ROOT)
        total = time.perf_counter() - t
        if proc.returncode:
            return {"task": "main-job", "engine": engine, "error": proc.stderr.strip()[-1500:]}
        metrics = json.loads((Path(tmp) / "metrics.json").read_text())
    return {"task": "main-job", "engine": engine, "minutes": round(total / 60, 2),
            "seconds_per_stage": {k: round(v, 1) for k, v in metrics["seconds_per_stage"].items()},
            "gold_reward": metrics["gold_reward"], "rm_eval_accuracy": metrics["rm_eval_accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="generate,ppo", help="comma-separated: generate, ppo, main-job, variants")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--ppo-steps", type=int, default=2, help="measured PPO steps after one warm-up step")
    p.add_argument("--one", nargs=2, metavar=("ENGINE", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--variant", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.one:
        for row in generate(*args.one, batches):
            print("RESULT " + json.dumps(row), flush=True)
        return
    if args.variant:
        for row in variant(*args.variant):
            print("RESULT " + json.dumps(row), flush=True)
        return
    rows = []
    only = args.only.split(",")
    if "generate" in only:
        for dtype in args.dtypes.split(","):
            for engine in ("hf", "vllm"):
                for row in run([sys.executable, __file__, "--one", engine, dtype, "--batches", args.batches]):
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    if "ppo" in only:
        for row in run([sys.executable, str(ROOT / "benchmarks" / "ppo_throughput.py"), "--models", "smol135",
                        "--configs", "defaults", "--dtypes", "bf16", "--engines", "hf,vllm",
                        "--steps", str(args.ppo_steps)]):
            print(json.dumps(row), flush=True)
            rows.append({"task": "ppo", **row})
    if "variants" in only:
        for dtype in args.dtypes.split(","):
            for name in ("eager", "compiled", "merged", "lora"):
                for row in run([sys.executable, __file__, "--variant", name, dtype]):
                    print(json.dumps(row), flush=True)
    if "main-job" in only:
        for engine in ("hf", "vllm"):
            row = main_job(engine)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\nvLLM / hf:")
    for row in rows:
        if row.get("task") == "generate" and row.get("engine") == "vllm":
            hf = next((r for r in rows if r.get("task") == "generate" and r.get("engine") == "hf"
                       and r["dtype"] == row["dtype"] and r["batch"] == row["batch"]), None)
            if hf:
                ratio = row["tokens_per_s"] / hf["tokens_per_s"]
                print(f"  generate {row['dtype']} batch {row['batch']}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
