"""The reward model: last-real-token pooling, parity with Hugging Face, save/load, normalisation."""

import json

import pytest
import torch

from preftune.data.records import RecordError
from preftune.models.logits import last_token_index
from preftune.models.reward_model import (
    META_FILE,
    RewardModel,
    last_real_token_mask,
    pair_token_type_ids,
    sequence_scores,
)
from preftune.models.tiny import build_tiny_model, build_tiny_tokenizer

PROMPTS = ["What is the capital of France?", [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Say hello."}], "Hi"]
RESPONSES = ["Paris.", "Hello there, it is nice to meet you!", "Hello"]


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0, 0]  # an empty row gives 0
    assert last_token_index(left).tolist() == [4, 4, 4]
    assert last_token_index(right.float()).tolist() == [2, 4, 0, 0]  # PPO's float response masks


def test_last_real_token_mask():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 1, 0]])
    assert last_real_token_mask(mask).long().tolist() == [[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]


@pytest.fixture(scope="module")
def tiny_rm_dir(tiny_model_dir):
    rm = RewardModel.from_backbone(str(tiny_model_dir), device="cpu", dtype="fp32")
    torch.nn.init.normal_(rm.model.score.weight, std=1.0)  # a head big enough to tell sequences apart
    return rm


def test_left_and_right_padding_give_the_same_scores(tiny_rm_dir):
    rm = tiny_rm_dir
    seqs = [rm.encode(p, r) for p, r in zip(PROMPTS, RESPONSES)]
    width = max(map(len, seqs))
    pad = rm.tokenizer.pad_token_id
    left = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    left_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    with torch.no_grad():
        from_left = sequence_scores(rm.model, left, left_mask)
        from_right = rm.forward_ids(seqs)
        one_by_one = torch.cat([rm.forward_ids([s]) for s in seqs])
    assert torch.allclose(from_left, one_by_one, atol=1e-5)
    assert torch.allclose(from_right, one_by_one, atol=1e-5)
    assert len(set(one_by_one.tolist())) == 3


def test_sequence_is_the_whole_templated_conversation_tokenised_at_once(tiny_rm_dir):
    rm = tiny_rm_dir
    full = rm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello"}], tokenize=False)
    assert rm.encode("Hi", "Hello") == rm.tokenizer(full, add_special_tokens=False)["input_ids"]
    assert rm.render("Hi", "Hello") == full and full.endswith("Hello<|im_end|>\n")  # TRL scores the newline too


# A chat template whose generation prompt ends with a space: the prompt ends inside a token
# (" the" is one token when read together, "the" alone otherwise).
SPACE_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def _hf_scores(directory, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    with torch.no_grad():
        return torch.cat([hf(**tok(t, add_special_tokens=False, return_tensors="pt")).logits[:, 0] for t in texts])


def _boundary_rm(tmp_path, chat_template: str | None):
    from preftune.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(["the sky is blue", "assistant: the answer"], chat_template=False)
    if chat_template:
        tok.chat_template = chat_template
    model = build_tiny_model(tok)
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    rm = RewardModel.from_backbone(str(tmp_path / "lm"), device="cpu", dtype="fp32")
    torch.nn.init.normal_(rm.model.score.weight, std=1.0)
    rm.save(tmp_path / "rm")
    return rm


def test_chat_template_scores_match_transformers_when_the_boundary_is_inside_a_token(tmp_path):
    from preftune.data.chat import encode_pair

    rm = _boundary_rm(tmp_path, SPACE_TEMPLATE)
    prompts, responses = ["Why?", "What colour is the sky?"], ["the sky is blue", "the answer is blue"]
    conversations = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                     for p, r in zip(prompts, responses)]
    texts = [rm.tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    split = encode_pair(rm.tokenizer, conversations[0][:1], responses[0]).input_ids
    assert split != rm.encode(prompts[0], responses[0])  # the set-up: apart, the tokens differ
    assert torch.allclose(_hf_scores(tmp_path / "rm", texts), rm.raw_scores(prompts, responses), atol=1e-5)


def test_plain_rendering_starts_with_bos_and_matches_transformers(tmp_path):
    rm = _boundary_rm(tmp_path, None)
    tok = rm.tokenizer
    prompts, responses = ["Why?", "Hi"], ["the sky is blue", " the answer"]
    texts = [f"{tok.bos_token}User: {p}\n\nAssistant: {r.lstrip()}{tok.eos_token}" for p, r in zip(prompts, responses)]
    assert [rm.render(p, r) for p, r in zip(prompts, responses)] == texts  # one space, however the response starts
    assert rm.encode("Hi", "x")[0] == tok.bos_token_id
    assert torch.allclose(_hf_scores(tmp_path / "rm", texts), rm.raw_scores(prompts, responses), atol=1e-5)


def test_a_long_conversation_loses_its_start_and_keeps_its_end(tiny_rm_dir):
    rm = tiny_rm_dir
    whole = rm.encode("word " * 300, "Hello")
    rm.meta.max_length, before = 64, rm.meta.max_length
    try:
        cut = rm.encode("word " * 300, "Hello")
        with pytest.raises(RecordError, match="over --max-length 64"):
            rm.encode("word " * 300, "Hello", truncate=False)
    finally:
        rm.meta.max_length = before
    assert cut == whole[-64:]


def test_saved_model_loads_in_plain_transformers_with_the_same_raw_scores(tiny_rm_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = tiny_rm_dir
    rm.meta.gain, rm.meta.bias = 2.0, -1.0
    rm.save(tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / META_FILE).read_text())["gain"] == 2.0
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert hf.config.num_labels == 1
    texts = [rm.render(p, r) for p, r in zip(PROMPTS, RESPONSES)]
    batch = tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        hf_scores = hf(**batch).logits[:, 0]
    ours = rm.raw_scores(PROMPTS, RESPONSES)
    assert torch.allclose(hf_scores, ours, atol=1e-5)
    loaded = RewardModel.load(tmp_path / "rm", device="cpu", dtype="fp32")
    assert torch.allclose(loaded.score(PROMPTS, RESPONSES), 2.0 * ours - 1.0, atol=1e-5)
    assert loaded.score(PROMPTS, RESPONSES).dtype == torch.float32


def test_encoder_backbone_reads_the_first_token_like_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification

    tok = build_tiny_tokenizer(chat_template=False)
    tok.cls_token, tok.sep_token = "<|im_start|>", "<|im_end|>"
    bert = build_tiny_model(tok, kind="bert")
    bert.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    rm = RewardModel.from_backbone(str(tmp_path / "bert"), device="cpu")
    assert not rm.decoder and rm.meta.rendering == "text_pair"
    ours = rm.raw_scores(PROMPTS, RESPONSES)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert").eval()
    with torch.no_grad():
        theirs = torch.cat([hf(input_ids=torch.tensor([rm.encode(p, r)])).logits[:, 0]
                            for p, r in zip(PROMPTS, RESPONSES)])
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_pair_token_type_ids_by_hand():
    # [CLS] a [SEP] b c [SEP] [PAD] with [CLS]=2, [SEP]=3, pad 0: segment 1 from b to the last [SEP]
    ids = torch.tensor([[2, 7, 3, 8, 9, 3, 0], [2, 7, 7, 3, 8, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0]])
    assert pair_token_type_ids(ids, mask, sep_id=3).tolist() == [[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 0]]


@pytest.fixture
def tiny_bert_dir(tmp_path):
    """A tiny BERT with a real WordPiece tokenizer (segment ids on text pairs, as bert-base has)."""
    from transformers import BertTokenizerFast

    words = sorted({w for text in ["user assistant system be brief say hello what is the capital of france "
                                   "hi paris there it nice to meet you sep"] for w in text.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *".,!?:[]"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})  # transformers 5 has no vocab_file
    assert tok.tokenize("hello there") == ["hello", "there"]  # the words are in it, not [UNK]
    bert = build_tiny_model(tok, kind="bert")
    bert.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


def test_bert_reward_matches_transformers_on_the_tokenizers_own_text_pair(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from preftune.data.chat import render_prompt

    rm = RewardModel.from_backbone(str(tiny_bert_dir), device="cpu")
    ours = rm.raw_scores(PROMPTS, RESPONSES)
    hf = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    messages = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in PROMPTS]
    batch = tok([render_prompt(tok, m) for m in messages], RESPONSES, padding=True, return_tensors="pt")
    assert batch["token_type_ids"].sum() > 0  # the responses are segment 1
    with torch.no_grad():
        theirs = hf(**batch).logits[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-5)
    # without the segment ids the scores differ: the check above can fail
    batch.pop("token_type_ids")
    with torch.no_grad():
        assert not torch.allclose(ours, hf(**batch).logits[:, 0], atol=1e-5)


def test_bert_reward_reads_a_literal_separator_in_the_text_as_text(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from preftune.data.chat import render_prompt

    rm = RewardModel.from_backbone(str(tiny_bert_dir), device="cpu")
    ids = rm.encode("Hi", "hello [SEP] there")
    assert ids.count(rm.tokenizer.sep_token_id) == 2  # only the pair's own separators
    hf = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    prompt = render_prompt(tok, [{"role": "user", "content": "Hi"}])
    batch = tok(prompt, "hello [SEP] there", split_special_tokens=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == ids
    with torch.no_grad():
        assert torch.allclose(rm.raw_scores(["Hi"], ["hello [SEP] there"]), hf(**batch).logits[:, 0], atol=1e-5)


def test_bert_reward_cuts_a_long_pair_from_the_prompt_and_keeps_the_whole_response(tiny_bert_dir):
    rm = RewardModel.from_backbone(str(tiny_bert_dir), device="cpu")
    tok, response = rm.tokenizer, "hello there " * 8  # 16 tokens: longer than the prompt
    whole = rm.encode("hi", response)
    response_ids = tok(response, add_special_tokens=False)["input_ids"]
    rm.meta.max_length = len(whole) - 2  # two of the prompt's tokens must go
    cut = rm.encode("hi", response)
    assert len(cut) == len(whole) - 2 and cut[-len(response_ids) - 1:-1] == response_ids
    assert cut[1:-len(response_ids) - 2] == whole[3:-len(response_ids) - 2]  # the prompt lost its start
    # A response over the limit on its own loses tokens too; the pair still fits.
    rm.meta.max_length = len(response_ids) - 4
    assert len(rm.encode("hi", response)) == len(response_ids) - 4


def test_missing_metadata_is_a_clear_error(tiny_model_dir):
    from preftune.errors import PreftuneError

    with pytest.raises(PreftuneError, match="not a preftune reward model"):
        RewardModel.load(tiny_model_dir)


def test_scorers_route_to_the_reward_model(tiny_rm_dir, tmp_path):
    from preftune.scoring import load_scorer

    tiny_rm_dir.save(tmp_path / "rm2")
    expected = tiny_rm_dir.score(PROMPTS, RESPONSES)
    for spec in (str(tmp_path / "rm2"), f"rm:{tmp_path / 'rm2'}", f"1 * rm:{tmp_path / 'rm2'}"):
        assert torch.allclose(load_scorer(spec, device="cpu", dtype="fp32")(PROMPTS, RESPONSES), expected, atol=1e-5)
    # A reward model receives the prompts as messages: its own chat template renders them.
    half = load_scorer(f"0.5*{tmp_path / 'rm2'} + 0.5 * rm:{tmp_path / 'rm2'}", dtype="fp32")
    assert torch.allclose(half(PROMPTS, RESPONSES), expected, atol=1e-5)
