"""TRL's RewardTrainer and DPOTrainer read preftune's `--format trl` comparisons with our meaning.

Recipe: simulated annotators (`preftune label --format trl`, labeler `length`) label pairs of
fixed answers to fixed prompts; TRL 1.16 (the peer environment that ../shared/bench/peers/setup.sh
builds) trains its RewardTrainer and DPOTrainer for two steps on that file, on the peer harness's
tiny Llama with SmolLM2's tokenizer and chat template. Then, back here:

* tokens: TRL's reward-model ids of every chosen and rejected conversation against
  `RewardModel.encode`, and TRL's DPO prompt + completion ids against ours (`encode_pair`);
* scores: the reward model TRL trained, loaded by preftune, scores our records as TRL scored them.

    python benchmarks/trl_interop.py [--peer-python /tmp/peer-trl116/bin/python] [--model DIR]

This file also runs inside the peer environment (`--trl-side`), where preftune is not installed:
keep its top-level imports to the standard library.
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

PEER_PYTHON = os.environ.get("PEER_PYTHON_TRL116", "/tmp/peer-trl116/bin/python")
PEER_MODEL = Path(os.environ.get("PEER_MODELS", "/tmp/peer-models")) / "tiny" / "policy"

PROMPTS = ["What colour is the sky?", "Name a fruit.", "How many legs has a spider?", "Say hello.",
           "What is 2 + 2?", "Where is Paris?", "Give me a word for happy.", "What do bees make?"]
ANSWERS = [("Blue.", "The sky is blue on a clear day, because air scatters blue light the most."),
           ("Apple.", "An apple, a pear or a banana are all fruit."),
           ("Eight.", "A spider has eight legs, two more than an insect."),
           ("Hello!", "Hello there, it is nice to meet you."),
           ("4", "Two plus two is four."),
           ("France.", "Paris is the capital of France, on the river Seine."),
           ("Glad.", "Joyful, cheerful or glad all mean happy."),
           ("Honey.", "Bees make honey and wax.")]


# ---------------------------------------------------------------- inside TRL's environment


def trl_side(data: str, model_dir: str, out: str) -> None:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    dataset = load_dataset("json", data_files=data, split="train")
    common = dict(max_steps=2, per_device_train_batch_size=4, logging_steps=1, report_to=[], save_strategy="no",
                  use_cpu=True, learning_rate=1e-4, bf16=False)  # TRL's default bf16 is beside the point here
    result = {"trl_columns": dataset.column_names}

    start = time.perf_counter()
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    trainer = RewardTrainer(model=rm, args=RewardConfig(output_dir=f"{out}/rm-run", **common),
                            train_dataset=dataset, processing_class=tok)
    trainer.train()
    trainer.save_model(f"{out}/rm")
    tok.save_pretrained(f"{out}/rm")
    rows = trainer.train_dataset
    rm = AutoModelForSequenceClassification.from_pretrained(f"{out}/rm").eval()  # plain transformers, fp32
    with torch.no_grad():
        scores = [rm(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in list(rows["chosen_ids"])]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result["reward"] = {"chosen_ids": list(rows["chosen_ids"]), "rejected_ids": list(rows["rejected_ids"]),
                        "chosen_scores": scores, "losses": losses, "seconds": time.perf_counter() - start}

    start = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = DPOTrainer(model=policy, args=DPOConfig(output_dir=f"{out}/dpo-run", beta=0.1, **common),
                         train_dataset=dataset, processing_class=tok)
    trainer.train()
    rows = trainer.train_dataset
    result["dpo"] = {"prompt_ids": list(rows["prompt_ids"]), "chosen_ids": list(rows["chosen_ids"]),
                     "rejected_ids": list(rows["rejected_ids"]),
                     "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                     "seconds": time.perf_counter() - start}
    Path(out, "trl.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- here


def make_comparisons(tmp: Path) -> Path:
    from preftune.annotators.config import LabelConfig
    from preftune.annotators.label import run_label

    candidates = tmp / "candidates.jsonl"
    candidates.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "responses": list(a)}) + "\n"
                                  for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS))))
    out = tmp / "comparisons.trl.jsonl"
    run_label(LabelConfig(candidates=str(candidates), out=str(out), labeler="length", format="trl"), quiet=True)
    return out


def compare(data: Path, model_dir: Path, trl: dict, trl_rm: Path) -> dict:
    import torch

    from preftune.data.chat import encode_pair
    from preftune.data.jsonl import read_jsonl
    from preftune.models.reward_model import RewardModel

    records = read_jsonl(data, "comparisons").records
    rm = RewardModel.from_backbone(str(model_dir), device="cpu", dtype="fp32")
    ours_rm = [(rm.encode(r.messages, r.chosen), rm.encode(r.messages, r.rejected)) for r in records]
    theirs_rm = list(zip(trl["reward"]["chosen_ids"], trl["reward"]["rejected_ids"]))
    tok = rm.tokenizer
    ours_dpo = [(encode_pair(tok, r.messages, r.chosen), encode_pair(tok, r.messages, r.rejected)) for r in records]
    theirs_dpo = list(zip(trl["dpo"]["prompt_ids"], trl["dpo"]["chosen_ids"], trl["dpo"]["rejected_ids"]))
    dpo_same = sum(c.input_ids == p + tc and r.input_ids == p + tr
                   for (c, r), (p, tc, tr) in zip(ours_dpo, theirs_dpo))
    trained = RewardModel.from_backbone(str(trl_rm), device="cpu", dtype="fp32")
    ours_scores = trained.raw_scores([r.messages for r in records], [r.chosen for r in records])
    diff = (ours_scores - torch.tensor(trl["reward"]["chosen_scores"])).abs().max().item()
    return {"pairs": len(records), "rm_tokens_identical": sum(a == b for a, b in zip(ours_rm, theirs_rm)),
            "dpo_tokens_identical": dpo_same, "score_max_abs_diff": diff,
            "trl_reward_losses": trl["reward"]["losses"], "trl_dpo_losses": trl["dpo"]["losses"],
            "trl_columns": trl["trl_columns"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer-python", default=PEER_PYTHON, help="python of the TRL 1.16 environment")
    p.add_argument("--model", default=str(PEER_MODEL), help="a causal LM directory with a chat template")
    p.add_argument("--trl-side", nargs=3, metavar=("DATA", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_side:
        trl_side(*args.trl_side)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if not Path(args.peer_python).exists():
        sys.exit(f"no TRL environment at {args.peer_python}: build it with ../shared/bench/peers/setup.sh")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_comparisons(tmp)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([args.peer_python, __file__, "--trl-side", str(data), args.model, str(tmp)],
                              env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"TRL failed on our export:\n{proc.stderr[-3000:]}")
        trl = json.loads((tmp / "trl.json").read_text())
        result = compare(data, Path(args.model), trl, tmp / "rm")
    print(json.dumps(result, indent=2))
    print(f"{result['pairs']} pairs from `preftune label --format trl` (columns {', '.join(result['trl_columns'])}): "
          f"reward-model tokens identical to TRL's for {result['rm_tokens_identical']}/{result['pairs']}, "
          f"DPO prompt + completion tokens for {result['dpo_tokens_identical']}/{result['pairs']}; "
          f"TRL-trained RM scored by preftune: max |diff| {result['score_max_abs_diff']:.2e}; "
          f"TRL RewardTrainer losses {result['trl_reward_losses']}, DPOTrainer losses {result['trl_dpo_losses']}")


if __name__ == "__main__":
    main()
