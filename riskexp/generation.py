"""Sampling from a causal LM and scoring text under it: batched generation, completion log-probs, perplexity.

Prompts are rendered and tokenised by `riskexp.prompts.prompt_token_ids`, as in training
(`riskexp.data.tokenize_pair`). Padding never comes from token ids: pad may equal eos, so every batch carries an
attention mask built from the true lengths. Sampling uses a generation config built here from the arguments
alone: nothing (repetition penalty, top-k, bad words, ...) is inherited from a checkpoint's
`generation_config.json`, so the samples come from the distribution the KL estimates assume.

`sampling_session`, `sample_batch` and `until_first_eos` are the pieces `generate` is made of; the RL rollout
(`riskexp.rl.rollout`) is made of the same ones.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from riskexp.logps import IGNORE_INDEX, pad_rows, sequence_stats
from riskexp.models import hidden_and_head
from riskexp.prompts import prompt_token_ids


@dataclass
class Samples:
    """What `generate` sampled, in the prompts' order."""

    texts: list[str]  # the new text, special tokens dropped
    prompt_ids: list[list[int]]  # the tokens each completion was conditioned on
    token_ids: list[list[int]]  # the sampled tokens, through the eos where one was emitted
    finished: list[bool]  # stopped at eos (False: cut at max_new_tokens)
    # log pi(y_t | x, y_<t) of each sampled token under the model itself (its raw logits: temperature 1, no
    # top-p), as float32 tensors aligned with token_ids; their sum is `completion_logps` without a second pass
    token_logps: list[torch.Tensor]

    @property
    def lengths(self) -> list[int]:
        """New tokens of each completion, not counting the eos."""
        return [len(ids) - done for ids, done in zip(self.token_ids, self.finished)]


def encode_prompts(tokenizer, prompts: Sequence[str | list[dict]], prompt_format: str) -> list[list[int]]:
    """The token ids of each prompt as `prompt_format` renders it (`riskexp.prompts.prompt_token_ids`); raises
    if one is empty."""
    ids = [prompt_token_ids(tokenizer, p, prompt_format) for p in prompts]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        # a causal LM needs at least one token to condition on (raw prompts get no BOS from e.g. SmolLM2)
        raise ValueError(f"prompt(s) at index {empty[:5]} tokenise to no tokens; nothing to condition on")
    return ids


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _own_generation_config(model) -> Iterator[None]:
    """The model's saved `generation_config` set aside for the duration: `generate` fills every field left
    unset in the config it is given from it (transformers >= 5), repetition penalties and bad words included."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def sampling_config(max_new_tokens: int, temperature: float, top_p: float, do_sample: bool, pad_token_id: int,
                    eos_token_ids: list[int], *, top_k: int = 0, min_new_tokens: int = 0):
    """The whole `transformers.GenerationConfig` of `generate` and of the RL rollout: tempered / top-k / nucleus
    sampling (or greedy), with the KV cache, and no other logits processor. top_k=0 (the default) switches off
    the library's default top-k of 50. `min_new_tokens` > 0 forbids the eos before that many new tokens; it is
    never `min_length`, which counts the (padded) prompt too."""
    from transformers import GenerationConfig

    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r}: accepted values are integers >= 0 (0: no top-k)")
    if (isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int)
            or not 0 <= min_new_tokens <= max_new_tokens):
        raise ValueError(f"min_new_tokens={min_new_tokens!r}: accepted values are integers in [0, max_new_tokens="
                         f"{max_new_tokens}]")
    sampling = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": top_k}
    # set only when used: the config then is the very one `generate` always had
    minimum = {"min_new_tokens": min_new_tokens} if min_new_tokens else {}
    # the raw logits of every step come back with the tokens: the model's own log-probs of its samples
    return GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                            eos_token_id=eos_token_ids or None, use_cache=True, output_logits=True,
                            return_dict_in_generate=True, **minimum,
                            **(sampling if do_sample else {"do_sample": False}))


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Eval mode (no dropout) for the duration; the caller's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _batches(lengths: Sequence[int], batch_size: int, descending: bool = True) -> list[list[int]]:
    """Indices grouped by length so each batch pads little; longest first, so memory errors show up at once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=descending)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a sample: the model's generation config's stop tokens and the tokenizer's eos."""
    # the model's generation config may list several stop tokens (Llama 3); the tokenizer's eos always stops
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id. The one fallback (pad = eos, for GPT-2 / Pythia) is `riskexp.models.load_tokenizer`'s,
    which every model loader goes through."""
    if tokenizer.pad_token_id is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name!r} has no pad token; load it with riskexp.models.load_tokenizer, "
                         "which sets pad = eos")
    return tokenizer.pad_token_id


@contextlib.contextmanager
def sampling_session(model, seed: int) -> Iterator[None]:
    """Sampling from `model` for the duration: eval mode (restored after), only the config passed to
    `model.generate` (its saved generation_config set aside), no grad, and the torch RNGs (CPU and every
    CUDA device) forked and seeded with `seed`, so the same seed draws the same tokens and the caller's global
    random state is left as it was."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with eval_mode(model), _own_generation_config(model), torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        yield


def sample_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 config) -> tuple[torch.Tensor, torch.Tensor]:
    """One `model.generate` call on a left-padded (B, P) batch: (new tokens (B, T), their log-probs (B, T)
    float32), on the model's device; T <= config.max_new_tokens, rows that stopped early are filled with pad.

    The log-probs are log pi(y_t | x, y_<t) from the raw logits of each step (before temperature, top-k, top-p
    and min_new_tokens): the model's own, as a forward pass on the sampled tokens gives them."""
    device = _device(model)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         generation_config=config)
    new = out.sequences[:, input_ids.shape[1] :]
    logps = torch.stack([step.float().log_softmax(-1).gather(1, new[:, t : t + 1]).squeeze(1)
                         for t, step in enumerate(out.logits)], 1)
    return new, logps


def until_first_eos(new: torch.Tensor, eos_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, finished) of sampled tokens (B, T): keep (B, T) bool is true up to and including each row's
    first eos (all true in a row without one), finished (B,) bool whether the row emitted an eos."""
    is_eos = torch.isin(new, torch.tensor(list(eos_ids), dtype=new.dtype, device=new.device))
    finished = is_eos.any(-1)
    # tokens after the first eos: an eos strictly before them
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return ~after, finished


def generate(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    *,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    batch_size: int = 32,
    seed: int = 0,
    prompt_format: str = "plain",
    progress: bool = True,
) -> Samples:
    """One completion per prompt (rendered by `prompt_format`, see `riskexp.prompts.render_prompt`), with the
    tokens sampled and whether each stopped at eos, drawn with `sampling_config` only.

    Batches group prompts of similar length and are left-padded with an attention mask (the tokenizer's own
    `padding_side` is not touched); generation stops at eos or after `max_new_tokens`. The same `seed`, prompts
    and batch size give the same completions, and the global RNG state is untouched. The model is evaluated in
    eval mode and returned to its previous mode.
    """
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0 when sampling; use do_sample=False for greedy")
    if not prompts:
        return Samples([], [], [], [], [])
    ids = encode_prompts(tokenizer, prompts, prompt_format)
    pad_id, eos_ids = pad_token_id(tokenizer), eos_token_ids(model, tokenizer)
    config = sampling_config(max_new_tokens, temperature, top_p, do_sample, pad_id, eos_ids)
    texts: list[str] = [""] * len(ids)
    token_ids: list[list[int]] = [[] for _ in ids]
    token_logps: list[torch.Tensor] = [torch.zeros(0) for _ in ids]
    finished = [False] * len(ids)
    with sampling_session(model, seed):
        # disable=None: no bar when the output is not a terminal
        for batch in tqdm(_batches([len(x) for x in ids], batch_size), desc="generate",
                          disable=None if progress else True):
            # left padding is done here, not through tokenizer.padding_side: a shared tokenizer is never mutated
            input_ids, mask = pad_rows([ids[i] for i in batch], pad_id, left=True)
            new, logps = sample_batch(model, input_ids, mask, config)
            keep, done = until_first_eos(new, eos_ids)
            new, logps, lengths = new.cpu(), logps.cpu(), keep.sum(-1).tolist()
            for row, i in enumerate(batch):
                tokens = new[row].tolist()
                n, finished[i] = lengths[row], bool(done[row])
                token_ids[i] = tokens[:n]
                token_logps[i] = logps[row, :n].clone()
                texts[i] = tokenizer.decode(tokens[: n - finished[i]], skip_special_tokens=True)
    return Samples(texts, ids, token_ids, finished, token_logps)


def _sequence_sums(model, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
    """`sequence_stats` of one right-padded batch under `model` (no grad)."""
    device = _device(model)
    batch = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
    hidden, head = hidden_and_head(model, batch)
    return sequence_stats(hidden, labels.to(device), policy_head=head)


def _labelled(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (ids, mask, labels) of (context, scored tokens) pairs; labels are -100 on the context."""
    ids, mask = pad_rows([c + s for c, s in rows], pad_id)
    labels, _ = pad_rows([[IGNORE_INDEX] * len(c) + s for c, s in rows], IGNORE_INDEX)
    return ids, mask, labels


def completion_logps(model, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], *, pad_id: int,
                     batch_size: int = 16) -> torch.Tensor:
    """sum_t log pi(y_t | x, y_<t) of token completions given their prompt tokens under `model`, float32 (N,).

    Scored on the very tokens `generate` sampled (eos included where emitted), not on re-tokenised text, so
    mean(completion_logps(pi) - completion_logps(ref)) over pi's samples estimates KL(pi || ref) without bias
    (at temperature 1 and top_p 1: otherwise the samples come from a different distribution than pi).
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    rows = [(list(c), list(s)) for c, s in zip(prompt_ids, completion_ids)]
    out = torch.zeros(len(rows))
    with eval_mode(model), torch.no_grad():
        for batch in _batches([len(c) + len(s) for c, s in rows], batch_size):
            stats = _sequence_sums(model, *_labelled([rows[i] for i in batch], pad_id))
            out[batch] = stats.policy_logps.float().cpu()
    return out


def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 16, max_length: int = 256) -> float:
    """exp(total NLL / total predicted tokens) over `texts`, each cut to its first `max_length` tokens."""
    ids = [x[:max_length] for x in tokenizer(list(texts))["input_ids"]] if texts else []
    # every token but the first is predicted (the first has no context)
    rows = [(x[:1], x[1:]) for x in ids if len(x) > 1]
    if not rows:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    nll, count = 0.0, 0
    pad_id = pad_token_id(tokenizer)
    with eval_mode(model), torch.no_grad():
        for batch in _batches([len(c) + len(s) for c, s in rows], batch_size):
            stats = _sequence_sums(model, *_labelled([rows[i] for i in batch], pad_id))
            nll -= stats.policy_logps.double().sum().item()
            count += int(stats.n_tokens.sum().item())
    return math.exp(nll / count)
