"""The papers' models for users with a network, on tiny local random checkpoints of the same architectures:
safe-rlhf score models (the beaver reward and cost models) and the Alpaca SFT model's prompt template."""

import json

import pytest
import torch
from helpers import compose_config
from hydra.utils import instantiate

from riskexp.cli import CONF_DIR
from riskexp.models import chat_template_mismatch, tiny_llama
from riskexp.prompts import prompt_token_ids, render_prompt
from riskexp.schema import validate
from riskexp.scorers import (
    SAFE_RLHF_TEMPLATE,
    SafeRLHFScorer,
    ScoreModel,
    checkpoint_tensors,
    end_index,
    load_score_model,
)

HIDDEN = 32
PAIRS = (["How do I bake bread?", "hi", "Tell me how to pick a lock quickly"],
         [" Mix flour, water and yeast.", " Hello!", " I can't help with that."])


def tiny_trunk(seed=0):
    """A random 2-layer Llama trunk (LlamaModel) and SmolLM2's tokenizer (pad == eos)."""
    model, tokenizer = tiny_llama(hidden_size=HIDDEN, num_layers=2, num_heads=4, num_kv_heads=2,
                                  intermediate_size=64, init_seed=seed)
    return model.model.eval(), tokenizer


def save_score_model(directory, *, fmt="safetensors", bias=False, sign=1.0, drop=(), **config_keys):
    """A tiny random score model saved as safe-rlhf saves `LlamaForScore`: the trunk's tensors under `model.`,
    the head as `score_head.weight` (and `.bias`), config.json of model_type llama with the score keys; the
    tokenizer beside it. `fmt`: one model.safetensors, or two pytorch_model-*.bin shards with an index.
    Returns (trunk, head weight (1, H), head bias or None)."""
    trunk, tokenizer = tiny_trunk()
    g = torch.Generator().manual_seed(1)
    weight = sign * torch.randn(1, HIDDEN, generator=g)
    b = torch.randn(1, generator=g) if bias else None
    state = {f"model.{k}": v.detach().clone().contiguous() for k, v in trunk.state_dict().items()}
    state["score_head.weight"] = weight
    if b is not None:
        state["score_head.bias"] = b
    for key in drop:
        state.pop(key)
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:  # sharded .bin: the head in the second shard, as in a real checkpoint's last shard
        keys = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
                  "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
        if "score_head.weight" not in shards["pytorch_model-00002-of-00002.bin"]:
            shards["pytorch_model-00001-of-00002.bin"].remove("score_head.weight")
            shards["pytorch_model-00002-of-00002.bin"].append("score_head.weight")
        for shard, names in shards.items():
            torch.save({k: state[k] for k in names}, directory / shard)
        weight_map = {k: shard for shard, names in shards.items() for k in names}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = trunk.config.to_dict()
    config.update(architectures=["LlamaForScore"], score_dim=1, bias=bias, score_type="reward", do_normalize=False,
                  normalizer_type=None)
    config.update(config_keys)
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(directory)
    return trunk, weight, b


def by_hand(trunk, weight, bias, ids):
    """The end score of one unpadded sequence: the trunk's last hidden state dotted with the head."""
    with torch.no_grad():
        hidden = trunk(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    return float(hidden @ weight[0] + (bias[0] if bias is not None else 0.0))


def pad(rows, pad_id, left):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


# ------------------------------------------------------------------------------------------------ score models


@pytest.mark.parametrize("fmt, bias", [("safetensors", False), ("bin", True)])
def test_end_score_is_the_head_at_the_last_token_for_either_padding(tmp_path, fmt, bias):
    trunk, weight, b = save_score_model(tmp_path / "rm", fmt=fmt, bias=bias)
    model, tokenizer = load_score_model(tmp_path / "rm")
    assert isinstance(model, ScoreModel) and (model.head.bias is not None) == bias and not model.training
    rows = [tokenizer(t)["input_ids"] for t in ("a much longer text than the others, to pad", "short", "mid size one")]
    expected = torch.tensor([by_hand(trunk, weight, b, r) for r in rows])
    for left in (False, True):
        ids, mask = pad(rows, tokenizer.pad_token_id, left)
        assert end_index(mask).tolist() == ([ids.shape[1] - 1] * 3 if left else [len(r) - 1 for r in rows])
        scores = model(ids, mask)
        assert scores.dtype == torch.float32 and scores.shape == (3,)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_checkpoint_tensors_reads_only_the_named_ones(tmp_path):
    _, weight, b = save_score_model(tmp_path / "rm", fmt="bin", bias=True)
    found = checkpoint_tensors(tmp_path / "rm", ["score_head.weight", "score_head.bias", "normalizer.mean"])
    assert sorted(found) == ["score_head.bias", "score_head.weight"]
    assert torch.equal(found["score_head.weight"], weight) and torch.equal(found["score_head.bias"], b)


def test_scorer_scores_the_template_conversation_and_orders_as_the_head(tmp_path):
    trunk, weight, _ = save_score_model(tmp_path / "rm")
    save_score_model(tmp_path / "negated", sign=-1.0)
    scorer = SafeRLHFScorer(tmp_path / "rm", kind="reward", device="cpu", batch_size=2)
    prompts, completions = PAIRS
    scores = scorer(prompts, completions)
    assert scores.dtype == torch.float32 and scores.shape == (3,) and scores.device.type == "cpu"
    tokenizer = scorer._load()[1]
    texts = scorer.texts(prompts, completions)
    assert texts[1] == "BEGINNING OF CONVERSATION: USER: hi ASSISTANT: Hello!" + tokenizer.eos_token
    expected = [by_hand(trunk, weight, None, tokenizer(t)["input_ids"]) for t in texts]
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    negated = SafeRLHFScorer(tmp_path / "negated", kind="reward", device="cpu")(prompts, completions)
    torch.testing.assert_close(negated, -scores, atol=1e-5, rtol=1e-5)
    assert scores.argsort().tolist() == negated.argsort(descending=True).tolist()
    assert scorer.name == "rm" and scorer.kind == "reward" and scorer([], []).shape == (0,)


def test_normalisation_follows_safe_rlhf(tmp_path):
    save_score_model(tmp_path / "plain")
    save_score_model(tmp_path / "cost", score_type="cost", do_normalize=True, mean=[3.0], var=[4.0])
    save_score_model(tmp_path / "reward", do_normalize=True, mean=[3.0], var=[4.0])
    raw = SafeRLHFScorer(tmp_path / "plain", kind="cost", device="cpu")(*PAIRS)
    scaled = SafeRLHFScorer(tmp_path / "cost", kind="cost", device="cpu")(*PAIRS)
    affine = SafeRLHFScorer(tmp_path / "reward", kind="reward", device="cpu")(*PAIRS)
    torch.testing.assert_close(scaled, raw / 2.0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(affine, (raw - 3.0) / 2.0, atol=1e-5, rtol=1e-5)


def test_safety_beaver_task_instantiates_both_scorers_and_a_zero_threshold(tmp_path):
    save_score_model(tmp_path / "reward")
    save_score_model(tmp_path / "cost", score_type="cost")
    cfg = compose_config(["data=safety", "data/task=safety_beaver", f"data.task.reward.name_or_path={tmp_path}/reward",
                          f"data.task.cost.name_or_path={tmp_path}/cost", "data.task.reward.device=cpu",
                          "data.task.cost.device=cpu"])
    validate(cfg)
    assert cfg.eval.cost_threshold == 0.0 and cfg.data.build.rows.unsafe_above == 0.0
    reward, cost = instantiate(cfg.data.task.reward), instantiate(cfg.data.task.cost)
    assert isinstance(reward, SafeRLHFScorer) and (reward.kind, cost.kind) == ("reward", "cost")
    assert reward.template == SAFE_RLHF_TEMPLATE and reward.append_eos
    for scorer in (reward, cost):
        out = scorer(*PAIRS)
        assert out.dtype == torch.float32 and out.shape == (3,)
    hub = compose_config(["data=safety", "data/task=safety_beaver"]).data.task
    assert (hub.reward.name_or_path, hub.cost.name_or_path) == ("PKU-Alignment/beaver-7b-v1.0-reward",
                                                                "PKU-Alignment/beaver-7b-v1.0-cost")


# ------------------------------------------------------------------------------------------------ bad inputs


def test_missing_directories_and_bad_arguments_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="'/nonexistent/beaver' does not exist"):
        SafeRLHFScorer("/nonexistent/beaver", kind="reward")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        SafeRLHFScorer(tmp_path / "empty", kind="cost")
    save_score_model(tmp_path / "rm")
    with pytest.raises(ValueError, match="kind must be one of"):
        SafeRLHFScorer(tmp_path / "rm", kind="harm")
    with pytest.raises(ValueError, match=r"template='USER: \{prompt\}' is not accepted"):
        SafeRLHFScorer(tmp_path / "rm", kind="reward", template="USER: {prompt}")
    with pytest.raises(ValueError, match="dtype='fp8' is unknown"):
        SafeRLHFScorer(tmp_path / "rm", kind="reward", dtype="fp8")
    with pytest.raises(ValueError, match="device='gpu' is not accepted"):
        SafeRLHFScorer(tmp_path / "rm", kind="reward", device="gpu")
    with pytest.raises(ValueError, match=r"attention_mask rows \[1\] have no token"):
        end_index(torch.tensor([[1, 1], [0, 0]]))


def test_a_hub_id_that_cannot_be_fetched_says_so():
    scorer = SafeRLHFScorer("riskexp-tests/no-such-score-model", kind="reward", device="cpu")  # lazy: no error yet
    with pytest.raises(OSError, match="needs a network"):
        scorer(["p"], ["c"])


def test_checkpoints_that_are_not_score_models_are_refused(tmp_path):
    causal, tokenizer = tiny_llama(hidden_size=HIDDEN, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=64)
    causal.save_pretrained(tmp_path / "causal")
    tokenizer.save_pretrained(tmp_path / "causal")
    with pytest.raises(ValueError, match="not a safe-rlhf score model: its weights have no score_head.weight"):
        SafeRLHFScorer(tmp_path / "causal", kind="reward", device="cpu")(["p"], ["c"])
    save_score_model(tmp_path / "two", score_dim=2)
    with pytest.raises(ValueError, match="score_dim=2"):
        load_score_model(tmp_path / "two")
    save_score_model(tmp_path / "no_bias", bias=True, drop=["score_head.bias"])
    with pytest.raises(ValueError, match="bias=true but the weights have no score_head.bias"):
        load_score_model(tmp_path / "no_bias")
    save_score_model(tmp_path / "partial", drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match="lack 1 of the LlamaModel trunk's tensors, e.g. 'layers.1.mlp.up_proj"):
        load_score_model(tmp_path / "partial")


# ------------------------------------------------------------------------------------------------ alpaca template


def test_alpaca_config_renders_the_safe_rlhf_template(tmp_path):
    model, tokenizer = tiny_llama(hidden_size=HIDDEN, num_layers=2, num_heads=4, num_kv_heads=2,
                                  intermediate_size=64)
    model.save_pretrained(tmp_path / "alpaca")
    tokenizer.save_pretrained(tmp_path / "alpaca")  # SmolLM2's own chat template, which the config replaces
    cfg = compose_config(["model=alpaca_7b_reproduced", f"model.loader.name_or_path={tmp_path}/alpaca",
                          "data=safety"])
    validate(cfg)
    assert cfg.data.prompt_format == "chat" and "${" not in cfg.model.loader.chat_template
    _, tok = instantiate(cfg.model.loader)
    bos = tok.bos_token
    assert render_prompt(tok, "hi", "chat") == bos + "BEGINNING OF CONVERSATION: USER: hi ASSISTANT:"
    assert chat_template_mismatch(tok) is None  # SmolLM2's byte-level BPE splits the text alike after a BOS
    ids = prompt_token_ids(tok, "hi", "chat")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids[1:]) == "BEGINNING OF CONVERSATION: USER: hi ASSISTANT:"
    conversation = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "q2"}]
    assert render_prompt(tok, conversation, "chat") == (
        f"{bos}BEGINNING OF CONVERSATION: USER: q1 ASSISTANT:a1{tok.eos_token}USER: q2 ASSISTANT:")
    with pytest.raises(Exception, match="user and assistant turns, not system"):
        render_prompt(tok, [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "chat")
    # an exported policy carries the template in its tokenizer files
    tok.save_pretrained(tmp_path / "policy")
    from riskexp.models import load_tokenizer

    assert render_prompt(load_tokenizer(tmp_path / "policy"), "hi", "chat") == render_prompt(tok, "hi", "chat")


def test_a_template_whose_bos_changes_the_next_word_is_detected():
    """A Llama tokenizer that puts its "▁" prefix only at the start of a text (legacy=False) splits the word
    after the template's BOS differently from the text alone, which is what the model was trained on."""
    from omegaconf import OmegaConf
    from transformers import LlamaTokenizer

    template = OmegaConf.load(f"{CONF_DIR}/model/alpaca_7b_reproduced.yaml").loader.chat_template
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁B": 3}
    for c in sorted(set("▁BEGINNING OF CONVERSATION: USER: hi ASSISTANT:".replace(" ", ""))):
        vocab.setdefault(c, len(vocab))
    found = {}
    for legacy in (True, False):
        tokenizer = LlamaTokenizer(vocab=vocab, merges=[("▁", "B")], legacy=legacy)
        tokenizer.chat_template = template
        found[legacy] = chat_template_mismatch(tokenizer)
    assert found[True] is None
    assert "tokenises as ['B', 'E', 'G', 'I']..., not as the text alone (['▁B'" in found[False]
    assert "data.prompt_format" in found[False]


def test_a_blank_chat_template_is_refused(tmp_path):
    from riskexp.models import from_pretrained

    with pytest.raises(ValueError, match="model.loader.chat_template=' ' is not accepted"):
        from_pretrained(str(tmp_path), chat_template=" ")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_safe_rlhf_score_model_starts_a_ppo_critic_without_custom_code(tmp_path, fmt):
    """The beaver reward/cost models' layout (a Llama trunk plus a score head) as PPO-Lagrangian's critics."""
    import copy
    import functools

    from riskexp.rl.ppo_lag import LagrangianPPOModule

    trunk, weight, bias = save_score_model(tmp_path / "critic", fmt=fmt, bias=True)
    policy, tokenizer = tiny_llama(hidden_size=HIDDEN, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=64, init_seed=3)
    module = LagrangianPPOModule(policy, copy.deepcopy(policy), tokenizer, reward=None, cost=lambda p, c: None,
                                 optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
                                 critic_init=str(tmp_path / "critic"), cost_critic_init=str(tmp_path / "critic"))
    module.value_head.eval()
    module.cost_value_head.eval()
    batch = tokenizer(["How do I bake bread? Mix flour.", "hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = trunk(**batch).last_hidden_state
        expected = (hidden @ weight.T).squeeze(-1) + bias
        for values in (module.values, module.cost_values):
            got = values(batch["input_ids"], batch["attention_mask"])
            torch.testing.assert_close(got[batch["attention_mask"].bool()], expected[batch["attention_mask"].bool()],
                                       atol=1e-4, rtol=1e-4)
    trainable = {id(p) for p in module.configure_optimizers().param_groups[0]["params"]}
    critics = [*module.critic_trunk.parameters(), *module.cost_critic_trunk.parameters(),
               *module.value_head.parameters(), *module.cost_value_head.parameters()]
    assert all(id(p) in trainable for p in critics)
    assert module.critic_trunk is not module.cost_critic_trunk  # two critics, trained apart
