"""SFT: masking, loss, packing, training on the tiny model, saving, resuming."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import QUICK, write_lines
from preftune.data.chat import encode_pair, render_prompt, render_response
from preftune.errors import DataError
from preftune.models.generation import generate
from preftune.models.logits import response_token_mask, selected_logits
from preftune.data.batching import Example, collate, encode_demonstrations, fit_length, pack_examples
from preftune.sft.config import SFTConfig
from preftune.sft.trainer import train_sft
from preftune.training.lm_loss import response_loss_sum
from preftune.data import read_jsonl

USER = [{"role": "user", "content": "Hi"}]


def test_chat_rendering_uses_template_and_boundary_is_exact(tiny_tokenizer):
    prompt = render_prompt(tiny_tokenizer, USER)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_response(tiny_tokenizer, USER, "Hello") == "Hello<|im_end|>\n"
    pair = encode_pair(tiny_tokenizer, USER, "Hello")
    assert tiny_tokenizer.decode(pair.prompt_ids) == prompt
    assert tiny_tokenizer.decode(pair.response_ids) == "Hello<|im_end|>\n"


def test_plain_text_fallback_without_chat_template(tiny_tokenizer):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = None
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert render_prompt(tok, msgs) == "System: S\n\nUser: Q\n\nAssistant:"
    assert render_response(tok, msgs, "A") == " A<|im_end|>"


def test_collate_masks_prompt_and_padding():
    a = Example(input_ids=[5, 6, 7, 8], labels=[-100, -100, 7, 8])
    b = Example(input_ids=[5, 9], labels=[-100, 9])
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 9, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # Positions whose logits predict a response token: t such that labels[t + 1] != -100.
    assert response_token_mask(batch["labels"]).tolist() == [[False, True, True, False],
                                                             [True, False, False, False]]


def test_encoded_labels_cover_response_only(tiny_tokenizer):
    pair = encode_pair(tiny_tokenizer, USER, "Hello there")
    assert pair.labels[:len(pair.prompt_ids)] == [-100] * len(pair.prompt_ids)
    assert pair.labels[len(pair.prompt_ids):] == pair.response_ids
    assert pair.response_ids[-2] == tiny_tokenizer.eos_token_id or pair.response_ids[-1] == tiny_tokenizer.eos_token_id


def test_response_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, 2])
    expected = -(2 - torch.log(torch.exp(torch.tensor(2.0)) + 2)) - (0 - torch.log(torch.exp(torch.tensor(1.0)) + 2))
    assert response_loss_sum(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_prompt_and_pad_tokens_get_zero_gradient_weight(tiny_model_dir):
    """Changing prompt-position targets or pad tokens must not change the loss."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    a = Example(input_ids=[3, 4, 5, 6, 7], labels=[-100, -100, 5, 6, 7])
    b = Example(input_ids=[3, 8, 9], labels=[-100, 8, 9])
    def loss_of(batch):
        select = response_token_mask(batch["labels"])
        logits = selected_logits(model, batch["input_ids"], batch["attention_mask"], select)
        return response_loss_sum(logits, batch["labels"][:, 1:][select[:, :-1]])
    batch = collate([a, b], pad_id=0)
    base = loss_of(batch)
    other_pad = collate([a, b], pad_id=11)  # different pad token id: masked by attention and labels
    assert loss_of(other_pad).item() == pytest.approx(base.item(), rel=1e-5)
    # Full-vocabulary reference computed by hand over the response targets only.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = sum(F.cross_entropy(logits[0, t], torch.tensor(a.input_ids[t + 1]), reduction="sum") for t in (1, 2, 3))
    ref = ref + sum(F.cross_entropy(logits[1, t], torch.tensor(b.input_ids[t + 1]), reduction="sum") for t in (0, 1))
    assert base.item() == pytest.approx(ref.item(), rel=1e-5)


def test_packing_keeps_examples_apart(tiny_model_dir):
    """The loss of a packed row equals the summed losses of its examples run one by one."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    exs = [Example([3, 4, 5, 6], [-100, -100, 5, 6]), Example([7, 8, 9], [-100, 8, 9]),
           Example([10, 11], [-100, 11])]
    packed = pack_examples(exs, max_length=16)
    assert len(packed) == 1 and packed[0].position_ids == [0, 1, 2, 3, 0, 1, 2, 0, 1]

    def loss(batch):
        select = response_token_mask(batch["labels"])
        logits = selected_logits(model, batch["input_ids"], batch["attention_mask"], select,
                                 batch.get("position_ids"))
        return response_loss_sum(logits, batch["labels"][:, 1:][select[:, :-1]]).item()

    separate = sum(loss(collate([e], 0)) for e in exs)
    assert loss(collate(packed, 0)) == pytest.approx(separate, rel=1e-4)


def test_over_long_records_error_truncate_or_skip(tiny_tokenizer, tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "a " * 50, "completion": "b"}, {"prompt": "x", "completion": "y"}])
    demos = read_jsonl(path, "demonstrations").records
    with pytest.raises(DataError, match=r"d\.jsonl:1: record is \d+ tokens, over --max-length 20"):
        encode_demonstrations(demos, tiny_tokenizer, 20, truncate=False, skip_invalid=False)
    kept, skipped = encode_demonstrations(demos, tiny_tokenizer, 20, truncate=False, skip_invalid=True)
    assert len(kept) == 1 and len(skipped) == 1 and "d.jsonl:1" in skipped[0]
    cut, _ = encode_demonstrations(demos, tiny_tokenizer, 20, truncate=True, skip_invalid=False)
    assert len(cut[0].input_ids) == 20 and cut[0].labels[-1] != -100
    pair = encode_pair(tiny_tokenizer, USER, "Hello")
    assert fit_length(pair, 100, truncate=False) is pair


def _cfg(tmp_path, model_dir, **kw) -> SFTConfig:
    base = dict(model=str(model_dir), data=str(QUICK / "demos.jsonl"), out=str(tmp_path / "out"), epochs=2,
                lr=3e-3, batch_size=8, eval_split=0.15, seed=3, warmup_ratio=0.1)
    return SFTConfig(**{**base, **kw})


def test_sft_lowers_held_out_loss_and_saves_a_plain_model(tmp_path, tiny_model_dir):
    summary = train_sft(_cfg(tmp_path, tiny_model_dir), quiet=True)
    assert summary["eval_loss"] < 0.7 * summary["initial_eval_loss"]
    out = tmp_path / "out"
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, summary["steps"] + 1))
    assert {"step", "loss", "lr", "tokens_per_s", "eval_loss"} <= rows[-1].keys()
    assert json.loads((out / "metrics.json").read_text())["eval_loss"] == pytest.approx(summary["eval_loss"])
    # Plain transformers loads it and generates.
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template(USER, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]


def test_sft_with_lora_merges_into_a_plain_model(tmp_path, tiny_model_dir):
    summary = train_sft(_cfg(tmp_path, tiny_model_dir, lora=True, lora_r=4, epochs=1, lr=1e-2), quiet=True)
    assert summary["eval_loss"] < summary["initial_eval_loss"]
    out = tmp_path / "out"
    assert not (out / "adapter_config.json").exists()
    names = load_file(str(out / "model.safetensors")).keys()
    assert not any("lora" in n for n in names)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_model_dir):
    full = _cfg(tmp_path / "a", tiny_model_dir, save_every=3, epochs=1)
    train_sft(full, quiet=True)
    interrupted = _cfg(tmp_path / "b", tiny_model_dir, save_every=3, epochs=1)
    assert train_sft(interrupted, stop_after=4, quiet=True) == {"stopped_at": 4}
    train_sft(interrupted.model_copy(update={"resume": True}), quiet=True)
    a = load_file(str(tmp_path / "a" / "out" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "out" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    la = (tmp_path / "a" / "out" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "out" / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "tokens_per_s"} for r in rows]
    assert strip(la) == strip(lb)


def test_generation_matches_greedy_hf_and_logprobs_match_forward(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [encode_pair(tok, USER, "x").prompt_ids,
               encode_pair(tok, [{"role": "user", "content": "What is the capital of France?"}], "x").prompt_ids]
    gen = generate(model, tok, prompts, max_new_tokens=6, temperature=0.0, return_logprobs=True)
    for i, p in enumerate(prompts):
        ref = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)[0, len(p):]
        n = int(gen.response_mask[i].sum())
        assert gen.response_ids[i, :n].tolist() == ref[:n].tolist()
        # Log-probabilities of the sampled tokens equal a fresh full forward pass.
        full = torch.tensor([p + gen.response_ids[i, :n].tolist()])
        logp = torch.log_softmax(model(full).logits[0, len(p) - 1:-1], -1)
        expected = logp.gather(-1, gen.response_ids[i, :n, None]).squeeze(-1)
        torch.testing.assert_close(gen.logprobs[i, :n], expected, atol=1e-4, rtol=1e-4)


def test_generation_stops_at_eos_and_stop_strings(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tok.eos_token_id
    # Force EOS as the most likely next token by boosting its output-embedding bias direction.
    with torch.no_grad():
        model.lm_head.weight[eos] *= 0
        model.lm_head.weight[eos] += model.model.norm.weight.sign() * 10
    gen = generate(model, tok, [encode_pair(tok, USER, "x").prompt_ids], max_new_tokens=8, temperature=0.0)
    assert gen.response_ids.shape[1] == 1 and gen.ended.tolist() == [True] and gen.texts == [""]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    first = generate(model, tok, [encode_pair(tok, USER, "x").prompt_ids], max_new_tokens=8, temperature=0.0)
    stop = first.texts[0][:3] if len(first.texts[0]) >= 3 else first.texts[0]
    if stop.strip():
        cut = generate(model, tok, [encode_pair(tok, USER, "x").prompt_ids], max_new_tokens=8, temperature=0.0,
                       stop=[stop])
        assert cut.ended.tolist() == [True] and stop not in cut.texts[0]
