"""PPO end to end on tiny models: learning, the KL controller, resume, outputs and bad input."""

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from preftune.cli import cli
from preftune.data.chat import encode_prompt
from preftune.errors import DataError, PreftuneError
from preftune.models.generation import generate, inverse_cdf_sample, row_seed
from preftune.models.loading import load_causal_lm
from preftune.rl.config import PPOConfig
from preftune.rl.models import ValueHead, reference_mode
from preftune.rl.rollout import Rollout, policy_forward, prompt_indices
from preftune.rl.trainer import train_rl
from preftune.training.monitor import OveroptimisationMonitor
from tests.conftest import write_lines

TOPICS = ["movie", "film", "day", "food", "book", "song", "city", "dog"]
REWARDS = '''
def e_count(prompts, responses):
    """The target: how often the letter e occurs in the response."""
    return [float(r.count("e")) for r in responses]

def e_tenth(prompts, responses):
    return [r.count("e") / 10 for r in responses]

def length(prompts, responses):
    return [float(len(r)) for r in responses]

def nan_reward(prompts, responses):
    return [float("nan")] * len(responses)

def short_reward(prompts, responses):
    return [1.0]
'''


@pytest.fixture()
def files(tmp_path):
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about the {t}."} for t in TOPICS])
    (tmp_path / "rewards.py").write_text(REWARDS)
    return tmp_path, prompts, tmp_path / "rewards.py"


def config(tiny_model_dir, tmp_path, prompts, rewards, **overrides):
    base = dict(policy=str(tiny_model_dir), reward=f"{rewards}:e_count", prompts=str(prompts),
                out=str(tmp_path / "out"), steps=4, batch_size=8, response_length=8, temperature=1.0,
                lora=False, lr=3e-3, threads=1)
    base.update(overrides)
    return PPOConfig(**base)


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- rollout mechanics


def test_generation_logprobs_equal_a_full_forward(tiny_model_dir):
    """The sampler's log-probs (KV cache) are what the update's forward gives, up to rounding."""
    model, tok = load_causal_lm(tiny_model_dir, dtype="fp32")
    prompts = [encode_prompt(tok, [{"role": "user", "content": t}])
               for t in ["hi", "Tell me a long story about the movie please", "good day"]]
    gen = generate(model, tok, prompts, max_new_tokens=12, temperature=0.7,
                   generator=torch.Generator().manual_seed(0), return_logprobs=True)
    episodes = Rollout(gen.prompt_ids, gen.prompt_mask, gen.response_ids, gen.response_mask.float(), gen.logprobs)
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.linear.weight)
    with torch.no_grad():
        out = policy_forward(model, episodes, 0.7, head)
        assert torch.allclose(out.logprobs, gen.logprobs, atol=1e-4)
        # a trimmed subset of rows gives the same numbers as the full batch
        sub = episodes.subset(torch.tensor([0, 2]))
        assert sub.prompt_ids.shape[1] < episodes.prompt_ids.shape[1]  # the long prompt's padding is gone
        part = policy_forward(model, sub, 0.7, head)
        width = sub.response_ids.shape[1]
        assert torch.allclose(part.logprobs, out.logprobs[[0, 2], :width], atol=1e-4)


def test_ended_flag_comes_from_the_eos_id_not_the_pad_id(tiny_model_dir):
    """The missing-EOS penalty relies on ``Generation.ended``. Make a frequent token the EOS and
    check the flag against the sampled ids: set exactly for the rows whose last real token is that
    EOS id (a peer tested the wrong token id), never for rows cut at the length limit."""
    from transformers import AutoTokenizer

    model, tok = load_causal_lm(tiny_model_dir, dtype="fp32")
    prompts = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in TOPICS]
    sample = lambda t: generate(model, t, prompts, max_new_tokens=12, temperature=1.0,
                                generator=torch.Generator().manual_seed(1))
    first = sample(tok)
    frequent = int(torch.mode(first.response_ids.flatten()).values)
    eos_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos_tok.eos_token = eos_tok.convert_ids_to_tokens(frequent)
    model.generation_config.eos_token_id = frequent
    gen = sample(eos_tok)
    lengths = gen.response_lengths
    last = gen.response_ids[torch.arange(len(prompts)), lengths - 1]
    assert gen.ended.tolist() == (last == frequent).tolist()
    assert gen.ended.any() and not gen.ended.all()
    assert all(lengths[i] == 12 for i in range(len(prompts)) if not gen.ended[i])
    assert eos_tok.pad_token_id != frequent


def test_num_eos_tokens_counts_the_stop_ids_the_model_declares(tiny_model_dir, files):
    """A model whose generation config lists more EOS ids than the tokenizer's (Llama 3 adds
    <|eot_id|>) ends responses at any of them; ``val/num_eos_tokens`` counts those ends too, one per
    ended response. A quarter of the tiny model's vocabulary is declared EOS, so most responses end."""
    tmp, prompts, rewards = files
    model, tok = load_causal_lm(tiny_model_dir, dtype="fp32")
    declared = [i for i in range(len(tok) // 4) if i != tok.pad_token_id]
    model.generation_config.eos_token_id = declared
    model.save_pretrained(tmp / "many-eos")
    tok.save_pretrained(tmp / "many-eos")
    cfg = config(tmp / "many-eos", tmp, prompts, rewards, steps=2)
    train_rl(cfg, quiet=True)
    rows = read_metrics(cfg.out)
    assert sum(r["val/ended"] for r in rows) > 0
    assert [r["val/num_eos_tokens"] for r in rows] == [round(r["val/ended"] * cfg.batch_size) for r in rows]


def test_inverse_cdf_sampling():
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]])  # cumulative 0.2, 0.2, 0.7, 1.0
    picks = [inverse_cdf_sample(probs, torch.tensor([u], dtype=torch.float64)).item()
             for u in (0.0, 0.19, 0.21, 0.69, 0.71, 0.999)]
    assert picks == [0, 0, 2, 2, 3, 3]  # token 1 has probability 0 and is never drawn
    # unnormalised rows (top-p/top-k leave zeros): u scales the row's total mass, here 0.4
    assert inverse_cdf_sample(torch.tensor([[0.0, 0.1, 0.3, 0.0]]), torch.tensor([0.3])).item() == 2  # 0.12 > 0.1


def test_row_seeded_sampling_does_not_depend_on_the_batch(tiny_model_dir):
    """A prompt's response depends on its seed only, not on the batch it is sampled in (what lets
    N processes reproduce one): the same rows alone, reordered or in other company agree."""
    model, tok = load_causal_lm(tiny_model_dir, dtype="fp32")
    prompts = [encode_prompt(tok, [{"role": "user", "content": f"Tell me about the {t}."}]) for t in TOPICS[:4]]
    seeds = [row_seed(7, 0, i) for i in range(4)]

    def sample(rows):
        gen = generate(model, tok, [prompts[i] for i in rows], max_new_tokens=10, temperature=1.0,
                       row_seeds=[seeds[i] for i in rows], return_logprobs=True)
        return {i: (gen.response_ids[k][gen.response_mask[k].bool()].tolist(), gen.logprobs[k][gen.response_mask[k].bool()])
                for k, i in enumerate(rows)}

    together, apart = sample([0, 1, 2, 3]), {**sample([3, 1]), **sample([2]), **sample([0])}
    for i in range(4):
        assert together[i][0] == apart[i][0]
        assert torch.allclose(together[i][1], apart[i][1], atol=1e-5)
    assert len({tuple(ids) for ids, _ in together.values()}) == 4
    other = generate(model, tok, prompts[:1], max_new_tokens=10, temperature=1.0, row_seeds=[row_seed(7, 1, 0)])
    assert other.response_ids[0].tolist() != together[0][0]  # another seed, another sample


def test_prompt_indices_cover_each_epoch_and_split_ranks():
    n, bs = 10, 4
    first_epoch = [i for step in range(2) for i in prompt_indices(step, bs, n, seed=3)] + \
        prompt_indices(2, bs, n, seed=3)[:2]
    assert sorted(first_epoch) == list(range(10))  # every prompt once per epoch, crossing step boundaries
    assert prompt_indices(5, bs, n, seed=3) == prompt_indices(5, bs, n, seed=3)  # fixed by (seed, step)
    ranks = [prompt_indices(0, 2, n, seed=3, rank=r, world=2) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert ranks[0] + ranks[1] == prompt_indices(0, 4, n, seed=3)


# ---------------------------------------------------------------- learning


def test_ppo_raises_the_reward_and_writes_a_plain_model(tiny_model_dir, files):
    tmp, prompts, rewards = files
    cfg = config(tiny_model_dir, tmp, prompts, rewards, steps=24, eval_every=12)
    train_rl(cfg, quiet=True)
    rows = read_metrics(cfg.out)
    scores = [r["objective/scores"] for r in rows]
    first, last = sum(scores[:4]) / 4, sum(scores[-4:]) / 4
    assert last > 2 * first + 1, scores
    assert all(math.isfinite(r["objective/kl"]) for r in rows)
    assert rows[-1]["objective/kl"] > 15  # the weak fixed leash lets it run (contrast: the adaptive test)
    for name in ["objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                 "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
                 "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens", "response_length_mean", "kl_coef", "eps",
                 "time/generation", "time/scoring", "time/old_and_reference", "time/update",
                 "policy/sampler_logprob_gap", "val/ratio_first_max_dev"]:
        assert name in rows[-1], name
    samples = [json.loads(line) for line in (Path(cfg.out) / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {12, 24}
    # the final policy is a plain Hugging Face directory
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(cfg.out)
    assert json.loads((Path(cfg.out) / "metrics.json").read_text())["steps"] == 24


def test_adaptive_kl_controller_holds_kl_near_target(tiny_model_dir, files):
    """The controller first lowers beta (KL below target), then raises it as the policy drifts,
    and keeps the KL around the target (the fixed weak leash above lets it pass 15 nats)."""
    tmp, prompts, rewards = files
    cfg = config(tiny_model_dir, tmp, prompts, rewards, steps=40, reward=f"{rewards}:e_tenth", kl_coef=0.1,
                 adaptive_kl=True, kl_target=4.0, kl_horizon=8, kl_warn=0)
    train_rl(cfg, quiet=True)
    rows = read_metrics(cfg.out)
    betas = [r["kl_coef"] for r in rows]
    lowest = betas.index(min(betas))
    assert min(betas) < betas[0] and max(betas[lowest:]) > 4 * min(betas)
    late_kl = [r["objective/kl"] for r in rows][-16:]
    assert 4.0 / 3 < sum(late_kl) / len(late_kl) < 4.0 * 3, late_kl
    assert max(late_kl) < 20


def test_lora_reference_is_the_sft_model_with_adapters_disabled(tiny_model_dir, files):
    tmp, prompts, rewards = files
    cfg = config(tiny_model_dir, tmp, prompts, rewards, steps=3, lora=True, lr=1e-2)
    train_rl(cfg, quiet=True)
    rows = read_metrics(cfg.out)
    assert abs(rows[0]["objective/kl"]) < 1e-4  # adapters start at zero: policy == reference
    assert rows[-1]["objective/kl"] != rows[0]["objective/kl"]
    tuned, _ = load_causal_lm(cfg.out, dtype="fp32")
    sft, _ = load_causal_lm(tiny_model_dir, dtype="fp32")
    assert not all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), sft.state_dict().values()))


def test_reference_mode_disables_adapters(tiny_model_dir):
    from preftune.training.lora import apply_lora

    model, _ = load_causal_lm(tiny_model_dir, dtype="fp32")
    ids = torch.tensor([[5, 6, 7, 8]])
    base = model(input_ids=ids).logits
    peft = apply_lora(model, 4, 8, 0.0, ["all-linear"])
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    assert not torch.allclose(peft(input_ids=ids).logits, base)
    with reference_mode(peft, None) as ref:
        assert torch.allclose(ref(input_ids=ids).logits, base, atol=1e-6)


def test_separate_value_model_and_ptx(tiny_model_dir, files):
    tmp, prompts, rewards = files
    demos = write_lines(tmp / "demos.jsonl", [{"prompt": "hi", "completion": "good day"}] * 4)
    cfg = config(tiny_model_dir, tmp, prompts, rewards, steps=2, value_model="policy", ptx_coef=0.5,
                 ptx_data=str(demos), missing_eos_penalty=-1.0)
    train_rl(cfg, quiet=True)
    rows = read_metrics(cfg.out)
    assert "loss/ptx_avg" in rows[-1] and rows[-1]["time/old_and_reference"] > 0
    # no response of the random tiny model ends within 8 tokens: all get the penalty
    assert rows[0]["val/ended"] == 0 and rows[0]["objective/scores"] == -1.0


def test_value_model_from_a_reward_model_keeps_its_score_head(tiny_model_dir, files):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from preftune.rl.models import load_value_model

    tmp, prompts, rewards = files
    config_ = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    rm = AutoModelForSequenceClassification.from_config(config_)
    torch.nn.init.normal_(rm.score.weight)
    rm.save_pretrained(tmp / "rm")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp / "rm")
    value = load_value_model(tmp / "rm", "cpu", torch.float32)
    assert torch.equal(value.head.linear.weight, rm.score.weight)
    cfg = config(tiny_model_dir, tmp, prompts, rewards, steps=1, value_model=str(tmp / "rm"))
    train_rl(cfg, quiet=True)
    assert read_metrics(cfg.out)[0]["loss/value_avg"] > 0


# ---------------------------------------------------------------- resume


def test_resume_reproduces_an_uninterrupted_run(tiny_model_dir, files):
    tmp, prompts, rewards = files
    common = dict(steps=6, save_every=3, adaptive_kl=True, kl_horizon=64, lora=True, lr=1e-2)
    straight = config(tiny_model_dir, tmp, prompts, rewards, out=str(tmp / "straight"), **common)
    train_rl(straight, quiet=True)
    broken = config(tiny_model_dir, tmp, prompts, rewards, out=str(tmp / "broken"), **common)
    assert train_rl(broken, stop_after=4, quiet=True) == {"stopped_at": 4}  # step 4 is lost with the crash
    train_rl(broken.model_copy(update={"resume": True}), quiet=True)

    def comparable(out):
        return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "eps"} for r in read_metrics(out)]

    a, b = comparable(straight.out), comparable(broken.out)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert a == b


# ---------------------------------------------------------------- bad input


def test_over_long_prompt_names_its_line_or_is_truncated(tiny_model_dir, files):
    tmp, _, rewards = files
    prompts = write_lines(tmp / "long.jsonl", [{"prompt": "short"}, {"prompt": "word " * 200}])
    cfg = config(tiny_model_dir, tmp, prompts, rewards, steps=1, max_length=64)
    with pytest.raises(DataError, match=r"long.jsonl:2: prompt is \d+ tokens"):
        train_rl(cfg, quiet=True)
    train_rl(cfg.model_copy(update={"truncate": True}), quiet=True)


def test_empty_prompt_is_an_error_naming_the_line(tiny_model_dir, files):
    tmp, _, rewards = files
    prompts = write_lines(tmp / "empty.jsonl", [{"prompt": "fine"}, {"prompt": "  "}])
    with pytest.raises(DataError, match="empty.jsonl:2"):
        train_rl(config(tiny_model_dir, tmp, prompts, rewards, steps=1), quiet=True)


@pytest.mark.parametrize("name, message", [("nan_reward", r"nan_reward returned nan"),
                                           ("short_reward", r"short_reward returned 1 scores for 8")])
def test_bad_reward_function_is_named(tiny_model_dir, files, name, message):
    tmp, prompts, rewards = files
    with pytest.raises(PreftuneError, match=message):
        train_rl(config(tiny_model_dir, tmp, prompts, rewards, steps=1, reward=f"{rewards}:{name}"), quiet=True)


def test_kl_stop_ends_the_run_with_a_reason(tiny_model_dir, files):
    tmp, prompts, rewards = files
    cfg = config(tiny_model_dir, tmp, prompts, rewards, steps=30, lr=3e-2, kl_coef=0.0, kl_stop=2.0)
    summary = train_rl(cfg, quiet=True)
    assert "passed --kl-stop" in summary["stopped"]
    assert len(read_metrics(cfg.out)) < 30
    assert (Path(cfg.out) / "config.json").exists()


# ---------------------------------------------------------------- evaluation and over-optimisation


def test_eval_prompts_gold_and_best_checkpoint(tiny_model_dir, files):
    tmp, prompts, rewards = files
    held = write_lines(tmp / "held.jsonl", [{"prompt": "Tell me about the sea."}, {"prompt": "And the sky?"}])
    cfg = config(tiny_model_dir, tmp, prompts, rewards, steps=4, eval_every=2, eval_prompts=str(held),
                 gold=f"{rewards}:length")
    train_rl(cfg, quiet=True)
    evals = [r for r in read_metrics(cfg.out) if "eval/gold" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval/sqrt_kl"] == pytest.approx(math.sqrt(max(r["eval/kl"], 0))) for r in evals)
    samples = [json.loads(line) for line in (Path(cfg.out) / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"prompt", "response", "score", "gold", "kl"} <= set(samples[0])
    best = json.loads((Path(cfg.out) / "best" / "preftune_best.json").read_text())
    assert best["eval/gold"] == max(r["eval/gold"] for r in evals)
    assert (Path(cfg.out) / "best" / "config.json").exists()


def test_overoptimisation_monitor():
    mon = OveroptimisationMonitor(drop=0.25)
    assert mon.update(1, proxy=0.0, gold=1.0) == (True, None)
    assert mon.update(2, proxy=1.0, gold=3.0) == (True, None)  # gain 2 over the first evaluation
    assert mon.update(3, proxy=2.0, gold=2.6)[1] is None  # lost 0.4 = 20 % of the gain: not yet
    best, alert = mon.update(4, proxy=3.0, gold=2.4)  # lost 0.6 = 30 % while the proxy rose
    assert not best and (alert.step, alert.best_step) == (4, 2) and alert.drop == pytest.approx(0.3)
    assert "step 4" in alert.message() and "30%" in alert.message()
    assert mon.update(5, proxy=0.5, gold=2.4)[1] is None  # proxy fell too: not over-optimisation


# ---------------------------------------------------------------- command line


def test_cli_help_and_one_line_errors(tiny_model_dir, files):
    tmp, prompts, rewards = files
    runner = CliRunner()
    help_text = runner.invoke(cli, ["ppo", "--help"]).output
    for flag in ["--batch-size", "--mini-batches", "--ppo-epochs", "--response-length", "--kl-coef",
                 "--kl-estimator", "--adaptive-kl", "--kl-target", "--kl-horizon", "--missing-eos-penalty",
                 "--value-model", "--ptx-coef", "--whiten-rewards", "--clip-value", "--eval-prompts", "--resume"]:
        assert flag in help_text, flag
    result = runner.invoke(cli, ["ppo", "--policy", str(tiny_model_dir), "--reward", "nope", "--prompts",
                                 str(prompts), "--out", str(tmp / "o")])
    assert result.exit_code == 2 and "unknown scorer 'nope'" in result.output
    cfg = tmp / "ppo.toml"
    cfg.write_text('[ppo]\nsteps = 1\nbatch-size = 4\nresponse-length = 4\nlora = false\n')
    result = runner.invoke(cli, ["ppo", "--config", str(cfg), "--policy", str(tiny_model_dir), "--reward",
                                 f"{rewards}:e_count", "--prompts", str(prompts), "--out", str(tmp / "o"),
                                 "--kl-estimator", "k3"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp / "o" / "run_config.json").read_text())["kl_estimator"] == "k3"
