"""The reward model: a Hugging Face sequence-classification model (one label) that scores text.

The scalar is read exactly where the architecture's ``...ForSequenceClassification`` class reads
it, so ``AutoModelForSequenceClassification.from_pretrained(DIR)`` reproduces our raw scores:

* causal LMs (Llama, Qwen, GPT-2, ...): the whole conversation rendered as one text (the chat
  template, or the plain format with BOS) and tokenised at once, as TRL and vLLM do; the score
  head applied to the hidden state of its last real token (for ChatML the newline after
  ``<|im_end|>``). We find it from the attention mask, which works with left and right padding;
  the pad id is distinct from EOS and never occurs in real text, so Hugging Face's pad-id search
  lands on the same token: ``model(**tokenizer(rm.render(p, r), add_special_tokens=False))``
  reproduces ``rm.raw_scores``;
* encoders (BERT and friends): the model's own head on the pooled first token ([CLS]); prompt and
  response are encoded as a text pair ``[CLS] prompt [SEP] response [SEP]``, with the segment ids
  (``token_type_ids``: 1 on the response) that the tokenizer gives such a pair, so
  ``model(**tokenizer(prompt, response, return_tensors="pt"))`` is the same call.

The reward model keeps its own tokenizer and chat rendering, so a policy with another tokenizer
can use it: ``RewardModel.load(DIR).score(prompts, responses)`` takes text. Scores are normalised
with the stored ``gain`` and ``bias`` (``score = gain * raw + bias``), chosen after training so
that reference responses score mean 0 and standard deviation 1.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from preftune.data.chat import has_chat_template, render_conversation, render_prompt
from preftune.data.records import Messages, RecordError
from preftune.errors import PreftuneError
from preftune.models.loading import disable_dropout, ensure_pad_token, resolve_device, resolve_dtype, resolve_model_path
from preftune.models.logits import last_token_index, selected_hidden, unwrap
from preftune.models.precision import fit_attention, resolve_precision
from preftune.models.saving import save_final_model
from preftune.progress import console

META_FILE = "reward_model.json"
FORMAT = "preftune-reward-model/2"
"""/2: a causal LM reads the whole conversation tokenised at once; /1 (before 2026-12) tokenised
prompt and response apart and ended at the end-of-turn token."""


# ---------------------------------------------------------------- pooling


def last_real_token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Boolean [B, T], true at each row's last real token: where a causal LM's reward is read."""
    select = torch.zeros_like(attention_mask, dtype=torch.bool)
    select[torch.arange(len(select), device=select.device), last_token_index(attention_mask)] = True
    return select


def is_decoder(model) -> bool:
    """Causal LMs read the last token; encoders (BERT-style) read the first."""
    inner = unwrap(model)
    return hasattr(inner, "score") and not getattr(inner.config, "is_encoder_decoder", False) \
        and inner.config.model_type not in ENCODER_TYPES


ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra",
                 "albert", "camembert", "mpnet", "modernbert"}


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None, sep_id: int | None = None,
                    all_heads: bool = False) -> torch.Tensor:
    """Raw scalar reward [B] of each sequence (see module docstring for where it is read;
    ``sep_id``: an encoder's [SEP], from which its segment ids are set, see ``pair_token_type_ids``).
    ``all_heads``: every output [B, H] (a length-debiased model's quality and length heads), not
    just the first, the reward."""
    pick = slice(None) if all_heads else 0
    inner = unwrap(model)
    fp32 = torch.autocast(input_ids.device.type, enabled=False)
    if not is_decoder(model):  # small, and the head sits inside the model's forward: all of it in fp32
        segments = {} if sep_id is None else {"token_type_ids": pair_token_type_ids(input_ids, attention_mask, sep_id)}
        with fp32:
            return model(input_ids=input_ids, attention_mask=attention_mask, **segments).logits[:, pick].float()
    if position_ids is None:  # left padding: positions count real tokens only
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    # The trunk over every token, the head on one position per row (the same numbers as the full
    # Hugging Face forward, which applies the head everywhere and then picks). The trunk may run in
    # bf16; the scalar head always runs in fp32 (its weights are kept in fp32), so close scores keep
    # their order.
    hidden = selected_hidden(model, input_ids, attention_mask, last_real_token_mask(attention_mask), position_ids)
    with fp32:
        return inner.score(hidden.float())[:, pick]


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (ids, mask)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[i, :len(seq)] = 1
    return ids, mask


def pair_token_type_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, sep_id: int) -> torch.Tensor:
    """Segment ids [B, T] of ``[CLS] prompt [SEP] response [SEP]`` rows: 0 up to the first [SEP]
    (included), 1 after it, 0 on padding, as BERT-style tokenizers return for a text pair."""
    is_sep = (input_ids == sep_id).long()
    seps_before = is_sep.cumsum(-1) - is_sep
    return ((seps_before > 0) & attention_mask.bool()).long()


def uses_token_types(tokenizer, decoder: bool) -> bool:
    """Encoders whose tokenizer gives a text pair segment ids (BERT, not RoBERTa/DistilBERT)."""
    return not decoder and "token_type_ids" in tokenizer.model_input_names and tokenizer.sep_token_id is not None


# ---------------------------------------------------------------- encoding


def encode_for_reward(tokenizer, messages: Messages, response: str, *, decoder: bool, max_length: int,
                      truncate: bool) -> list[int]:
    """Token ids the reward model reads for one (prompt, response); ``RecordError`` when over
    ``max_length`` and not ``truncate`` (then the text loses tokens from its start, the prompt's).

    A causal LM reads the whole conversation tokenised at once (``render_conversation``): the
    ecosystem's rule, so plain transformers, TRL and vLLM's reward serving see the same tokens.
    Where the prompt ends inside a token (a generation prompt ending with a space, say), the joint
    tokens differ from the policy's own prompt and response tokens: the reward model scores the
    text, never the policy's ids."""
    if decoder:
        ids = tokenizer(render_conversation(tokenizer, messages, response), add_special_tokens=False)["input_ids"]
        if tokenizer.pad_token_id in ids:
            raise RecordError(f"the text contains the pad token {tokenizer.pad_token!r}")
        if len(ids) > max_length:
            if not truncate:
                raise RecordError(f"prompt + response is {len(ids)} tokens, over --max-length {max_length} "
                                  f"(use --truncate to cut the prompt)")
            ids = ids[-max_length:]  # the end, where the score is read, stays
        return ids
    return encode_text_pair(tokenizer, messages, response, max_length, truncate)


def encode_text_pair(tokenizer, messages: Messages, response: str, max_length: int, truncate: bool) -> list[int]:
    """``[CLS] prompt [SEP] response [SEP]`` ids (over-long pairs lose prompt tokens from the left).
    Under the plain rendering a literal "[SEP]" (or other special token) in the text stays text, so
    only the tokenizer's own separators split the segments (``pair_token_type_ids``); a chat
    template's markers are special tokens and are kept as such."""
    prompt = render_prompt(tokenizer, messages)
    literal = not has_chat_template(tokenizer)
    full = tokenizer(prompt, response, add_special_tokens=True, split_special_tokens=literal)["input_ids"]
    if len(full) <= max_length:
        return full
    if not truncate:
        raise RecordError(f"prompt + response is {len(full)} tokens, over --max-length {max_length} "
                          f"(use --truncate to cut the prompt)")
    # Only the prompt loses tokens, unless the response alone is over (then both do, as the decoder's
    # cut keeps the end): "longest_first" would cut a long response's start before a short prompt.
    prompt_length = len(tokenizer(prompt, add_special_tokens=False, split_special_tokens=literal)["input_ids"])
    strategy = "only_first" if prompt_length > len(full) - max_length else "longest_first"
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        return tokenizer(prompt, response, add_special_tokens=True, split_special_tokens=literal,
                         truncation=strategy, max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = side


# ---------------------------------------------------------------- the model


@dataclass
class RewardMeta:
    """What ``score`` needs besides the weights; stored as ``reward_model.json``."""

    gain: float = 1.0
    bias: float = 0.0
    max_length: int = 512
    rendering: str = "chat_template"  # chat_template | plain | text_pair
    heads: list[str] = field(default_factory=lambda: ["quality"])  # outputs; the first is the reward
    normalisation: dict = field(default_factory=dict)  # reference, count, raw mean / std
    backbone: str = ""
    format: str = FORMAT


def _as_messages(prompt: Messages | str) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


class RewardModel:
    """Scores (prompt, response) text with a sequence-classification model and its own tokenizer."""

    def __init__(self, model, tokenizer, meta: RewardMeta | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.meta = meta or RewardMeta(rendering=self.default_rendering(model, tokenizer))
        self.decoder = is_decoder(model)

    @staticmethod
    def default_rendering(model, tokenizer) -> str:
        if not is_decoder(model):
            return "text_pair"
        return "chat_template" if has_chat_template(tokenizer) else "plain"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------ loading and saving

    @classmethod
    def from_backbone(cls, path: str, *, device: str | torch.device | None = None,
                      dtype: str | torch.dtype | None = None, max_length: int = 512,
                      compute: str | None = None, length_head: bool = False) -> "RewardModel":
        """A fresh reward model on top of a causal-LM or encoder directory (score head newly
        initialised by transformers, small random values); ``dtype`` and ``compute`` as in
        ``load_causal_lm``. ``length_head``: a second output, trained to carry the response's
        length so that the first (the reward) need not (``preftune reward --length-head``)."""
        heads = ["quality", "length"] if length_head else ["quality"]
        model, tokenizer = _load_seq_cls(resolve_model_path(path), device, dtype, compute, num_labels=len(heads))
        rm = cls(model, tokenizer)
        rm.meta.max_length, rm.meta.backbone, rm.meta.heads = max_length, str(path), heads
        return rm

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None) -> "RewardModel":
        """Load a directory written by ``preftune reward`` (or ``RewardModel.save``)."""
        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.exists():
            raise PreftuneError(f"{path}: not a preftune reward model (no {META_FILE}); "
                                f"train one with `preftune reward`")
        try:
            meta = RewardMeta(**json.loads(meta_path.read_text()))
        except (ValueError, TypeError) as e:
            raise PreftuneError(f"{meta_path}: invalid reward-model metadata: {e}") from None
        model, tokenizer = _load_seq_cls(path, device, dtype, num_labels=len(meta.heads))
        rm = cls(model, tokenizer, meta)
        if meta.format != FORMAT and rm.decoder:
            console.print(f"[yellow]{path}: trained by an older preftune ({meta.format}), which tokenised prompt "
                          f"and response apart; scores can differ slightly from training (retrain to match)")
        return rm

    def save(self, out: str | Path, sharded: bool = False, is_main: bool = True) -> None:
        """Plain Hugging Face directory (+ ``reward_model.json``); LoRA adapters are merged. Under
        torchrun every rank calls this and rank 0 writes (``sharded``: FSDP, gathered first)."""
        out = Path(out)
        save_final_model(self.model, self.tokenizer, out, sharded=sharded, is_main=is_main)
        if is_main:
            (out / META_FILE).write_text(json.dumps(asdict(self.meta), indent=2) + "\n")

    # ------------------------------------------------------------ scoring

    def encode(self, prompt: Messages | str, response: str, *, truncate: bool = True) -> list[int]:
        return encode_for_reward(self.tokenizer, _as_messages(prompt), response, decoder=self.decoder,
                                 max_length=self.meta.max_length, truncate=truncate)

    def render(self, prompt: Messages | str, response: str) -> str:
        """The exact text the model reads for one (prompt, response): a causal LM's whole
        conversation (its start cut when over ``max_length``), an encoder's decoded text pair."""
        if self.decoder:
            text = render_conversation(self.tokenizer, _as_messages(prompt), response)
            if len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) <= self.meta.max_length:
                return text
        return self.tokenizer.decode(self.encode(prompt, response))

    @property
    def sep_id(self) -> int | None:
        """The [SEP] id that ``pair_token_type_ids`` splits at, or None (no segment ids)."""
        return self.tokenizer.sep_token_id if uses_token_types(self.tokenizer, self.decoder) else None

    def forward_ids(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Raw scores [N] of already encoded sequences, one right-padded forward (with grad)."""
        ids, mask = right_pad(sequences, self.tokenizer.pad_token_id)
        return sequence_scores(self.model, ids.to(self.device), mask.to(self.device), sep_id=self.sep_id)

    @torch.no_grad()
    def raw_scores(self, prompts: Sequence[Messages | str], responses: Sequence[str],
                   batch_size: int = 16) -> torch.Tensor:
        """Unnormalised scores [N] (float32, CPU); long inputs are truncated from the prompt's start."""
        if len(prompts) != len(responses):
            raise PreftuneError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        was_training = self.model.training
        self.model.eval()
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # less padding
        scores = torch.zeros(len(encoded), dtype=torch.float32)
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            scores[chunk] = self.forward_ids([encoded[j] for j in chunk]).float().cpu()
        self.model.train(was_training)
        return scores

    def score(self, prompts: Sequence[Messages | str], responses: Sequence[str]) -> torch.Tensor:
        """Normalised rewards [N] (float32, CPU): ``gain * raw + bias``."""
        return self.meta.gain * self.raw_scores(prompts, responses) + self.meta.bias


def _load_seq_cls(directory: Path, device, dtype, compute: str | None = None, num_labels: int = 1):
    """(model, tokenizer). A decoder's trunk is stored in ``dtype`` (computing in ``compute``, default
    ``dtype``'s precision) and its scalar head in fp32; encoders are stored in fp32 whatever ``dtype``
    says (see ``sequence_scores``)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        encoder = AutoConfig.from_pretrained(directory).model_type in ENCODER_TYPES
        if encoder:
            dt = torch.float32
        # (a new score head is expected: preftune.models.loading keeps transformers' notices quiet)
        model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=num_labels, dtype=dt)
    except (OSError, ValueError) as e:
        raise PreftuneError(f"{directory}: could not load a reward model: {str(e).splitlines()[0]}") from None
    if not encoder:
        fit_attention(model, dev, compute or resolve_precision(dt, dev))
    ensure_pad_token(tokenizer, model)
    disable_dropout(model)
    if isinstance(getattr(model, "score", None), torch.nn.Module):
        model.score.float()
    return model.to(dev).eval(), tokenizer
