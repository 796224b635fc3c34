"""Writes demos.jsonl: the demo task's demonstrations, made the documented way.

Stand-in for human-written demonstrations: for each of 150 training prompts (a seeded subset), the
base model (SmolLM2-135M-Instruct) samples 8 responses of at most 48 new tokens (the main job's
length limit, so a kept answer is one that finishes within it) and the gold labeler (``helpful``)
keeps the best one. Prompts used here are not used for comparisons in the main job (see
preftune/pipeline/run.py). Run from the repository root:

    python examples/demo/make_demos.py [--model smollm2-135m-instruct] [--prompts 150] [--n 8]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

DEMO_PROMPTS = 150
SEED = 11


def demo_prompt_ids(rows: list[dict], count: int = DEMO_PROMPTS) -> set[str]:
    """The ids of the training prompts that demonstrations are written for."""
    train = sorted(r["id"] for r in rows if r.get("split") == "train")
    return set(random.Random(SEED).sample(train, count))


def main() -> None:
    from preftune.sampling.config import SampleConfig
    from preftune.sampling.sample import sample_candidates
    from preftune.scoring import load_scorer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=DEMO_PROMPTS)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    rows = [json.loads(l) for l in (HERE / "prompts.jsonl").read_text().splitlines()]
    chosen = demo_prompt_ids(rows, args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"]}) + "\n"
                                   for r in rows if r["id"] in chosen))
        cands = Path(tmp) / "candidates.jsonl"
        sample_candidates(SampleConfig(model=[args.model], prompts=str(prompts), out=str(cands), n=args.n,
                                       max_new_tokens=args.max_new_tokens, temperature=0.8, seed=SEED,
                                       batch_size=32))
        sets = [json.loads(l) for l in cands.read_text().splitlines()]
    gold = load_scorer("helpful")
    out, best_scores, mean_scores = [], [], []
    for s in sets:
        scores = gold([s["prompt"]] * len(s["responses"]), s["responses"]).tolist()
        k = max(range(len(scores)), key=scores.__getitem__)
        best_scores.append(scores[k])
        mean_scores.append(sum(scores) / len(scores))
        out.append({"id": s["id"], "prompt": s["prompt"], "completion": s["responses"][k]})
    (HERE / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    print(f"{len(out)} demonstrations; gold of the kept responses {sum(best_scores) / len(out):.3f} "
          f"vs {sum(mean_scores) / len(out):.3f} for a random sample")


if __name__ == "__main__":
    main()
