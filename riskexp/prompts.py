"""Prompt rendering: the one place that turns a prompt (a text or a chat message list) into what a model sees.

Training (`riskexp.data.tokenize_pair`), preference building, sampling and evaluation (`riskexp.generation`) all
tokenise prompts through `prompt_token_ids`, so a model is trained and evaluated on the same text. The format is
`data.prompt_format`. Nothing here imports torch, so configs can be checked with `check_prompt_format` early.
"""

from __future__ import annotations

import string
from typing import Any

ACCEPTED = "'chat', 'plain', or a format string whose only field is {prompt}"
# how a prompt + response too long for max_length is cut (riskexp.data.tokenize_pair); here, beside the prompt
# rendering, so configs are checked without importing torch
TRUNCATION_MODES = ("keep_end", "keep_start")  # which end of a too-long prompt is kept
TRUNCATIONS = ("reference", "prompt_room")  # how far responses are cut
_HH_TAGS = {"user": "\n\nHuman: ", "assistant": "\n\nAssistant: ", "system": ""}


def check_prompt_format(prompt_format: Any) -> str:
    """`prompt_format` itself if accepted (see `render_prompt`), else a ValueError naming it."""
    if prompt_format in ("chat", "plain"):
        return prompt_format
    if isinstance(prompt_format, str):
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(prompt_format) if name is not None}
        except ValueError:  # unbalanced braces
            fields = set()
        if fields == {"prompt"}:
            return prompt_format
    raise ValueError(
        f"prompt_format={prompt_format!r} is not accepted: {ACCEPTED}, "
        "e.g. 'BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:'"
    )


def is_messages(value: Any) -> bool:
    """A non-empty list of `{"role": str, "content": str, ...}` chat messages."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value)
    )


def hh_text(messages: list[dict]) -> str:
    """Anthropic-HH rendering of a conversation: "\\n\\nHuman: a\\n\\nAssistant: b ... \\n\\nAssistant:"."""
    unknown = {m["role"] for m in messages} - _HH_TAGS.keys()
    if unknown:
        raise ValueError(f"cannot render roles {sorted(unknown)} as HH text; accepted: {sorted(_HH_TAGS)}")
    return "".join(_HH_TAGS[m["role"]] + m["content"] for m in messages) + "\n\nAssistant:"


def uses_chat_template(tokenizer, prompt_format: str) -> bool:
    """Whether `render_prompt` applies the tokenizer's chat template (whose text holds its special tokens)."""
    return check_prompt_format(prompt_format) == "chat" and bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: str | list[dict], prompt_format: str) -> str:
    """The text the model is conditioned on, for `prompt_format`:

    - `chat`: the tokenizer's chat template with the generation prompt, a string being one user turn. A
      tokenizer without a template (GPT-2, Pythia) renders as `plain`: its models were trained on HH text.
    - `plain`: a string as is (a continuation task: the response follows the text exactly); a message list as
      HH text, "\\n\\nHuman: ...\\n\\nAssistant:" (the DPO reference code's rendering).
    - a format string with a `{prompt}` field, e.g. "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
      (the safety papers' SFT template): the string, or the content of a single user message, put in place.
    """
    if not (isinstance(prompt, str) or is_messages(prompt)):
        raise ValueError(f"a prompt is a string or a list of chat messages, got {prompt!r:.80}")
    if uses_chat_template(tokenizer, prompt_format):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if prompt_format in ("chat", "plain"):
        return prompt if isinstance(prompt, str) else hh_text(prompt)
    if isinstance(prompt, list):
        if len(prompt) != 1 or prompt[0]["role"] != "user":
            raise ValueError(f"prompt_format={prompt_format!r} renders a single user turn; got a conversation of "
                             f"{len(prompt)} messages: use prompt_format=chat or plain")
        prompt = prompt[0]["content"]
    return prompt_format.format(prompt=prompt)


def prompt_token_ids(tokenizer, prompt: str | list[dict], prompt_format: str) -> list[int]:
    """Token ids of the rendered prompt. Chat-template text already holds its special tokens
    (`add_special_tokens=False`); plain and format-string text gets the tokenizer's own (a BOS for Llama
    tokenizers, nothing for SmolLM2 / GPT-2)."""
    text = render_prompt(tokenizer, prompt, prompt_format)
    return tokenizer(text, add_special_tokens=not uses_chat_template(tokenizer, prompt_format))["input_ids"]
