"""Hub model configs load local directories of the same architectures through the same code path."""

import pytest
import torch
from hydra.utils import instantiate

from riskexp.models import SMOLLM2_TOKENIZER, hidden_and_head, load_tokenizer, trunk_and_head
from riskexp.run import run


def save_tiny(kind, directory):
    """A random-init GPT-2 or GPT-NeoX (Pythia's architecture) with a real tokenizer but no chat template,
    saved like a hub checkpoint."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = load_tokenizer(SMOLLM2_TOKENIZER)
    tokenizer.chat_template = None  # GPT-2 and Pythia have none: prompts render as plain Human/Assistant text
    vocab = len(tokenizer)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=256))
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64,
                                                 max_position_embeddings=256))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("config, kind", [("gpt2_large", "gpt2"), ("pythia_1.4b", "neox")])
def test_hub_configs_train_on_local_checkpoints(smoke_cfg, tmp_path, config, kind):
    local = save_tiny(kind, tmp_path / "checkpoint")
    cfg = smoke_cfg(f"model={config}", f"model.loader.name_or_path={local}", "algo=tdpo", "trainer.max_steps=1",
                    "data.max_length=32", "data.max_prompt_length=16", output_dir=tmp_path / "run")
    model, tokenizer = instantiate(cfg.model.loader)
    assert tokenizer.chat_template is None and tokenizer.pad_token_id is not None
    # the output head is split from the trunk, so logits are formed chunk by chunk, and equal the full forward
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert trunk_and_head(model) is not None
    hidden, head = hidden_and_head(model, batch)
    assert torch.allclose(head(hidden), model(**batch).logits, atol=1e-5)
    results = run(cfg)
    assert results["model"] == config and results["steps"] == 1 and results["val/kl_chosen"] >= 0


def test_remote_code_is_never_trusted(monkeypatch):
    import transformers

    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    from riskexp.models import from_pretrained

    with pytest.raises(OSError):
        from_pretrained("EleutherAI/pythia-1.4b")
    assert seen["trust_remote_code"] is False


def test_bad_dtype_and_missing_path_are_named(smoke_cfg):
    from riskexp.models import build_policy_and_reference, torch_dtype

    with pytest.raises(ValueError, match="model.dtype='float8'"):
        torch_dtype("float8")
    with pytest.raises(FileNotFoundError, match="model.path='/nonexistent'"):
        build_policy_and_reference(lambda: None, path="/nonexistent")


def test_inference_device_is_the_gpu_when_there_is_one(monkeypatch):
    from riskexp.models import inference_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_device() == torch.device("cpu")


def test_evaluation_reference_is_the_base_model(tmp_path):
    from riskexp.models import build_policy_and_reference, tiny_llama

    exported = tmp_path / "policy"
    model, tokenizer = tiny_llama(init_seed=1)
    model.save_pretrained(exported)
    tokenizer.save_pretrained(exported)
    base = tiny_llama()[0].state_dict()
    policy, reference, _ = build_policy_and_reference(tiny_llama, str(exported), reference_is_base=True)
    first = "model.embed_tokens.weight"
    assert torch.equal(policy.state_dict()[first], model.state_dict()[first])
    assert torch.equal(reference.state_dict()[first], base[first]) and not reference.training
    # training: the reference is a frozen copy of the initial (exported) policy
    policy, reference, _ = build_policy_and_reference(tiny_llama, str(exported))
    assert torch.equal(reference.state_dict()[first], model.state_dict()[first]) and reference is not policy
    # evaluating the base model itself: one model, no copy
    policy, reference, _ = build_policy_and_reference(tiny_llama, reference_is_base=True)
    assert reference is policy
