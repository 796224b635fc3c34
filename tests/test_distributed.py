"""torchrun with 2 CPU processes (gloo) against 1 process with the doubled batch.

Tolerances: the runs differ only in the order of floating-point sums (shares summed across ranks,
other padding widths), so losses agree to 1e-4 relative and weights to 1e-5 at the learning rates
used here. (At high learning rates PPO amplifies such rounding: a probability ratio on the clip
boundary flips; one process with --grad-accum 2 against 1 differs as much.)
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK, ROOT, vllm_only, write_lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFTUNE_DIST_TIMEOUT": "120"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "preftune", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def sft_args(model, out, batch, *flags: str, **extra) -> list[str]:
    args = ["sft", "--model", str(model), "--data", str(QUICK / "demos.jsonl"), "--out", str(out),
            "--batch-size", str(batch), "--lr", "3e-3", "--eval-split", "0.1", "--seed", "5", "--threads", "1",
            "--dtype", "fp32"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args + list(flags)


def assert_weights_close(a, b, atol):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4)


def test_sft_two_ranks_match_one_rank_with_double_batch(tmp_path, tiny_model_dir):
    launch(2, sft_args(tiny_model_dir, tmp_path / "two", 4, max_steps=6, save_every=3))
    launch(1, sft_args(tiny_model_dir, tmp_path / "one", 8, max_steps=6))
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert two["world_size"] == 2 and len(set(two["rank_param_checksums"])) == 1
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    la = [json.loads(l)["loss"] for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-4)
    assert_weights_close(tmp_path / "two", tmp_path / "one", atol=1e-5)

    # The checkpoint the 2-rank run wrote at step 3 resumes in a single process (batch 8 = 2 x 4).
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    os.rename(tmp_path / "two" / "checkpoints" / "step-000003", resumed / "checkpoints" / "step-000003")
    launch(1, sft_args(tiny_model_dir, resumed, 8, "--resume", max_steps=6))
    assert_weights_close(resumed, tmp_path / "one", atol=1e-5)


def test_sft_fsdp_with_lora_matches_one_rank(tmp_path, tiny_model_dir):
    common = dict(max_steps=4, lora_r=4, lr="1e-2")
    launch(2, sft_args(tiny_model_dir, tmp_path / "fsdp", 4, "--fsdp", "--lora", save_every=2, **common))
    launch(1, sft_args(tiny_model_dir, tmp_path / "one", 8, "--lora", **common))
    assert_weights_close(tmp_path / "fsdp", tmp_path / "one", atol=1e-5)
    assert (tmp_path / "fsdp" / "checkpoints" / "step-000002" / "model.safetensors").exists()


def test_sft_fsdp_epoch_end_with_an_idle_rank_and_accumulation_matches_one_rank(tmp_path, tiny_model_dir):
    """79 training examples in global batches of 12: the last batch has 7, rank 1 gets 1 of them and
    --grad-accum 4 cuts both ranks' shares into 4 passes (3 of rank 1's empty), as FSDP needs."""
    common = dict(epochs=1, grad_accum=4)
    launch(2, sft_args(tiny_model_dir, tmp_path / "two", 6, "--fsdp", **common))
    launch(1, sft_args(tiny_model_dir, tmp_path / "one", 12, **common))
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["steps"] == 7
    assert_weights_close(tmp_path / "two", tmp_path / "one", atol=1e-5)


def test_dpo_two_ranks_match_one_rank_even_with_an_idle_rank(tmp_path, tiny_model_dir):
    """57 pairs in global batches of 8: the last step's only pair is rank 0's and rank 1 joins the
    gradient all-reduce with a pass weighted 0."""
    topics = ["apple", "river", "song", "book", "garden", "city", "movie", "mountain", "cake", "dog"]
    rows = [{"prompt": f"Tell me about a {t} {i}.", "chosen": f"What a lovely {t}! I love it.",
             "rejected": f"The {t} is bad and boring."} for i in range(6) for t in topics][:57]
    data = tmp_path / "cmp.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def args(out, batch):
        return ["dpo", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--batch-size",
                str(batch), "--eval-split", "0", "--epochs", "1", "--lr", "3e-3", "--beta", "0.5", "--seed", "1",
                "--threads", "1", "--dtype", "fp32"]

    launch(2, args(tmp_path / "two", 4))
    launch(1, args(tmp_path / "one", 8))
    la = [json.loads(l)["loss"] for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == 8 and la == pytest.approx(lb, rel=1e-4)
    assert_weights_close(tmp_path / "two", tmp_path / "one", atol=1e-5)


def test_micro_batches_are_as_many_on_every_rank():
    from preftune.training.distributed import DistInfo, micro_batches

    assert micro_batches(["a", "b", "c"], per_rank=4, parts=2) == [["a", "b"], ["c"]]
    assert micro_batches(["a", "b"], per_rank=4, parts=2) == [["a", "b"], []]  # the last rank's short share
    assert micro_batches([], per_rank=1, parts=3) == [[]]  # nothing left for this rank: one empty pass
    # 5 groups on 2 ranks: shares of 3 and 2
    assert [DistInfo(r, 2).my_slice(list(range(5))) for r in range(2)] == [[0, 1, 2], [3, 4]]


def cli_args(stage: str, options: dict) -> list[str]:
    """Command-line flags for ``options`` (the same dict builds the in-process config)."""
    args = [stage]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        args += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
    return args


def metric_rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k not in ("eps", "tokens_per_s")}
            for r in rows]


def assert_curves_close(a, b, rel=1e-4, abs_=1e-6):
    ra, rb = metric_rows(a), metric_rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=rel, abs=abs_), (x["step"], k)


def resume_on_one_rank(two_rank_out, resumed_out, step: int) -> None:
    (resumed_out / "checkpoints").mkdir(parents=True)
    name = f"step-{step:06d}"
    os.rename(two_rank_out / "checkpoints" / name, resumed_out / "checkpoints" / name)


# ---------------------------------------------------------------- reward


@pytest.fixture(scope="module")
def preferences(tmp_path_factory):
    """Comparisons, rankings (several pairs per group) and ratings: groups of unequal size."""
    rng = random.Random(0)
    words = "great happy love bad sad awful the cat dog river city film day book tree".split()
    good, bad = set(words[:3]), set(words[3:6])
    gold = lambda t: sum(w in good for w in t.split()) - sum(w in bad for w in t.split())  # noqa: E731
    text = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))  # noqa: E731
    rows = []
    for i in range(40):
        a, b = text(), text()
        rows.append({"prompt": f"Review {i % 7}.", "chosen": max(a, b, key=gold), "rejected": min(a, b, key=gold)})
    for _ in range(8):
        responses = [text() for _ in range(3)]
        rows.append({"prompt": "Rank these.", "responses": responses, "annotator": "r",
                     "ranking": sorted(range(3), key=lambda k: -gold(responses[k]))})
    for i in range(6):
        rows += [{"prompt": f"Rate {i}.", "response": text(), "rating": rng.randint(1, 3), "annotator": "b"}
                 for _ in range(3)]
    return write_lines(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", [r for r in rows if "chosen" not in r
                                                                         or r["chosen"] != r["rejected"]])


def reward_options(model, data, out, batch, **extra) -> dict:
    return {"model": str(model), "data": str(data), "out": str(out), "batch_size": batch, "lr": 1e-3,
            "max_steps": 6, "eval_split": 0.25, "seed": 5, "max_length": 64, "threads": 1, "device": "cpu",
            "dtype": "fp32", **extra}


def test_reward_two_ranks_match_one_rank_with_double_batch(tmp_path, tiny_model_dir, preferences):
    from preftune.reward.config import RewardConfig
    from preftune.reward.trainer import train_reward

    launch(2, cli_args("reward", reward_options(tiny_model_dir, preferences, tmp_path / "two", 4, grad_accum=2,
                                                save_every=3)))
    one = train_reward(RewardConfig(**reward_options(tiny_model_dir, preferences, tmp_path / "one", 8)), quiet=True)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and len(set(two["rank_param_checksums"])) == 1
    for key in ("eval_loss", "eval_accuracy", "eval_ece", "eval_reward_mean", "eval_reward_std", "gain", "bias",
                "initial_eval_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    assert two["eval_accuracy_by_annotator"] == one["eval_accuracy_by_annotator"]
    assert_curves_close(tmp_path / "two", tmp_path / "one")
    # 1e-4: Adam divides by sqrt(v), so a weight whose gradient is almost 0 turns the ranks' other
    # summation order into a visible step (one of 8192 weights moved 4.6e-5 after 6 steps at lr 1e-3).
    assert_weights_close(tmp_path / "two", tmp_path / "one", atol=1e-4)
    meta = json.loads((tmp_path / "two" / "reward_model.json").read_text())
    assert meta["gain"] == two["gain"]

    # The checkpoint of step 3 written by 2 ranks resumes in one process (batch 8 = 2 x 4).
    resume_on_one_rank(tmp_path / "two", tmp_path / "resumed", 3)
    train_reward(RewardConfig(**reward_options(tiny_model_dir, preferences, tmp_path / "resumed", 8, resume=True)),
                 quiet=True)
    assert_weights_close(tmp_path / "resumed", tmp_path / "one", atol=1e-4)  # as above


def test_reward_fsdp_with_lora_matches_one_rank(tmp_path, tiny_model_dir, preferences):
    from preftune.reward.config import RewardConfig
    from preftune.reward.trainer import train_reward

    common = dict(lora=True, lora_r=4)
    launch(2, cli_args("reward", reward_options(tiny_model_dir, preferences, tmp_path / "fsdp", 4, fsdp=True,
                                                save_every=2, **common)))
    one = train_reward(RewardConfig(**reward_options(tiny_model_dir, preferences, tmp_path / "one", 8, **common)),
                       quiet=True)
    fsdp = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert fsdp["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    assert fsdp["gain"] == pytest.approx(one["gain"], rel=1e-4)
    assert_weights_close(tmp_path / "fsdp", tmp_path / "one", atol=1e-5)  # merged, gathered, plain HF
    resume_on_one_rank(tmp_path / "fsdp", tmp_path / "resumed", 4)
    train_reward(RewardConfig(**reward_options(tiny_model_dir, preferences, tmp_path / "resumed", 8, resume=True,
                                               **common)), quiet=True)
    assert_weights_close(tmp_path / "resumed", tmp_path / "one", atol=1e-5)


# ---------------------------------------------------------------- PPO

REWARDS = """
def e_count(prompts, responses):
    return [float(r.count("e")) for r in responses]

def length(prompts, responses):
    return [len(r) / 10 for r in responses]
"""
TOPICS = ["movie", "film", "day", "food", "book", "song", "city", "dog"]


@pytest.fixture(scope="module")
def ppo_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo")
    (d / "rewards.py").write_text(REWARDS)
    write_lines(d / "prompts.jsonl", [{"prompt": f"Tell me about the {t}."} for t in TOPICS])
    write_lines(d / "held.jsonl", [{"prompt": f"What about the {t}?"} for t in TOPICS[:5]])
    return d


def ppo_options(model, files, out, batch, **extra) -> dict:
    return {"policy": str(model), "reward": f"{files / 'rewards.py'}:e_count", "prompts": str(files / "prompts.jsonl"),
            "out": str(out), "batch_size": batch, "steps": 4, "response_length": 8, "temperature": 1.0,
            "lr": 1e-3, "seed": 3, "threads": 1, "dtype": "fp32", "eval_prompts": str(files / "held.jsonl"),
            "gold": f"{files / 'rewards.py'}:length", "eval_every": 2, **extra}


def test_ppo_two_ranks_match_one_rank_with_double_batch(tmp_path, tiny_model_dir, ppo_files):
    """Full fine-tuning (a frozen reference copy), uneven mini-batch shares (3 mini-batches of 8
    episodes), micro-batches on the 2 ranks only, reward whitening, the adaptive KL controller and
    the held-out evaluation with a gold reward."""
    from preftune.rl.config import PPOConfig
    from preftune.rl.trainer import train_rl

    common = dict(lora=False, mini_batches=3, whiten_rewards=True, adaptive_kl=True, kl_horizon=64)
    launch(2, cli_args("ppo", ppo_options(tiny_model_dir, ppo_files, tmp_path / "two", 4, grad_accum=2,
                                          save_every=2, **common)))
    train_rl(PPOConfig(**ppo_options(tiny_model_dir, ppo_files, tmp_path / "one", 8, **common)), quiet=True)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and len(set(two["rank_param_checksums"])) == 1
    assert_curves_close(tmp_path / "two", tmp_path / "one")
    rows = [metric_rows(tmp_path / out) for out in ("two", "one")]
    assert rows[0][-1]["kl_coef"] != rows[0][0]["kl_coef"]  # the controller moved, on the global KL
    samples = [[json.loads(line) for line in (tmp_path / out / "samples.jsonl").read_text().splitlines()]
               for out in ("two", "one")]
    assert [(s["step"], s["prompt"], s["response"]) for s in samples[0]] == \
        [(s["step"], s["prompt"], s["response"]) for s in samples[1]]
    assert len(samples[0]) == 10  # 5 held-out prompts at steps 2 and 4, sampled on both ranks
    assert_weights_close(tmp_path / "two", tmp_path / "one", atol=1e-5)

    resume_on_one_rank(tmp_path / "two", tmp_path / "resumed", 2)
    train_rl(PPOConfig(**ppo_options(tiny_model_dir, ppo_files, tmp_path / "resumed", 8, resume=True, **common)),
              quiet=True)
    assert_weights_close(tmp_path / "resumed", tmp_path / "one", atol=1e-5)


@vllm_only
@pytest.mark.parametrize("lora", [False, True])
def test_ppo_two_ranks_each_with_a_vllm_engine_match_one_rank(lora, tmp_path, vllm_model_dir, ppo_files):
    """``--engine vllm`` under torchrun: each rank samples its share with its own engine (vLLM's
    external launcher on the ranks' process group) and syncs it after every update (with LoRA: the
    adapters merged). Per-request seeds make the two ranks' samples, curves and weights those of one
    process with the doubled batch."""
    options = dict(lora=lora, engine="vllm", **({"lora_r": 4} if lora else {}))
    launch(2, cli_args("ppo", ppo_options(vllm_model_dir, ppo_files, tmp_path / "two", 4, **options)))
    one = subprocess.run([sys.executable, "-m", "preftune",
                          *cli_args("ppo", ppo_options(vllm_model_dir, ppo_files, tmp_path / "one", 8, **options))],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and len(set(two["rank_param_checksums"])) == 1
    assert all(r["policy/sampler_logprob_gap"] < 1e-4 for r in metric_rows(tmp_path / "two"))  # synced engines
    assert_curves_close(tmp_path / "two", tmp_path / "one")
    samples = [[(s["step"], s["prompt"], s["response"]) for s in map(json.loads, (tmp_path / out / "samples.jsonl")
                                                                      .read_text().splitlines())]
               for out in ("two", "one")]
    assert samples[0] == samples[1] and len(samples[0]) == 10
    assert_weights_close(tmp_path / "two", tmp_path / "one", atol=1e-5)


@vllm_only
def test_vllm_with_fsdp_is_refused_in_one_line(tmp_path, vllm_model_dir, ppo_files):
    proc = launch(2, cli_args("ppo", ppo_options(vllm_model_dir, ppo_files, tmp_path / "fsdp", 4, engine="vllm",
                                                 fsdp=True)), check=False)
    # each rank says it in one line (torchrun then reports its failed children)
    assert proc.returncode != 0 and "PreftuneError" not in proc.stderr
    assert "--engine vllm with --fsdp" in proc.stderr + proc.stdout


def test_ppo_fsdp_with_lora_matches_one_rank(tmp_path, tiny_model_dir, ppo_files):
    """FSDP2 + LoRA: sampling, the reference (adapters disabled) and the update all run through the
    sharded model; the best-gold policy and the final one are gathered to rank 0."""
    from preftune.rl.config import PPOConfig
    from preftune.rl.trainer import train_rl

    common = dict(lora=True, lora_r=4)
    launch(2, cli_args("ppo", ppo_options(tiny_model_dir, ppo_files, tmp_path / "fsdp", 4, fsdp=True, save_every=2,
                                          **common)))
    train_rl(PPOConfig(**ppo_options(tiny_model_dir, ppo_files, tmp_path / "one", 8, **common)), quiet=True)
    assert_curves_close(tmp_path / "fsdp", tmp_path / "one")
    assert_weights_close(tmp_path / "fsdp", tmp_path / "one", atol=1e-5)
    assert_weights_close(tmp_path / "fsdp" / "best", tmp_path / "one" / "best", atol=1e-5)
    assert (tmp_path / "fsdp" / "checkpoints" / "step-000002" / "policy.safetensors").exists()


@pytest.mark.parametrize("method, extra", [
    ("rloo", dict(samples_per_prompt=2, normalize_advantages=True)),  # batch-wide whitening across ranks
    ("grpo", dict(samples_per_prompt=2, scale_rewards="batch", loss_type="grpo", dynamic_sampling=True)),
])
def test_critic_free_two_ranks_match_one_rank_with_double_batch(method, extra, tmp_path, tiny_model_dir, ppo_files):
    """RLOO and GRPO: each rank samples whole groups (K samples of its prompts); batch statistics
    (advantage whitening, the batch std, dropped groups) and every loss mean are over both ranks."""
    from preftune.rl.config import ALGORITHMS
    from preftune.rl.trainer import train_rl

    common = dict(lora=False, mini_batches=3, **extra)
    launch(2, cli_args(method, ppo_options(tiny_model_dir, ppo_files, tmp_path / "two", 4, grad_accum=2, **common)))
    train_rl(ALGORITHMS[method](**ppo_options(tiny_model_dir, ppo_files, tmp_path / "one", 8, **common)), quiet=True)
    assert_curves_close(tmp_path / "two", tmp_path / "one")
    assert_weights_close(tmp_path / "two", tmp_path / "one", atol=1e-5)
