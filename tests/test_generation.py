import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import OPENINGS

from riskexp.generation import completion_logps, generate, perplexity
from riskexp.prompts import prompt_token_ids, render_prompt

PROMPTS = OPENINGS


def _gen(model, tok, prompts=PROMPTS, **kw):
    kw = {"max_new_tokens": 6, "batch_size": 2, "progress": False, **kw}
    return generate(model, tok, prompts, **kw).texts


def test_render_prompt_formats(tiny):
    _, tok = tiny
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "egg?"}]
    assert render_prompt(tok, "hi", "plain") == "hi"
    assert render_prompt(tok, messages, "plain") == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: egg?\n\nAssistant:"
    text = render_prompt(tok, "hi", "chat")
    assert text == render_prompt(tok, [messages[0]], "chat") and text.endswith("<|im_start|>user\nhi<|im_end|>\n"
                                                                              "<|im_start|>assistant\n")
    assert render_prompt(tok, "hi", "USER: {prompt} ASSISTANT:") == "USER: hi ASSISTANT:"
    # chat-template text carries its special tokens; plain text gets the tokenizer's own
    assert prompt_token_ids(tok, "hi", "chat") == tok(text, add_special_tokens=False)["input_ids"]
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    assert render_prompt(plain, messages, "chat") == render_prompt(plain, messages, "plain")
    for bad in ("chatml", "USER: {text}", "{prompt} {other}", "{prompt"):
        with pytest.raises(ValueError, match=r"prompt_format=.*not accepted.*'chat', 'plain'.*\{prompt\}"):
            render_prompt(tok, "hi", bad)
    with pytest.raises(ValueError, match="a prompt is a string or a list of chat messages"):
        render_prompt(tok, [{"role": "user"}], "chat")


def _with_saved_generation_config(model, directory, **settings):
    """`model` saved and loaded back with `settings` in its generation_config.json, as a hub checkpoint."""
    saved = copy.deepcopy(model)
    for key, value in settings.items():
        setattr(saved.generation_config, key, value)
    saved.save_pretrained(directory)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory)


def test_generation_ignores_the_checkpoints_generation_config(tiny, tmp_path):
    model, tok = tiny
    penalised = _with_saved_generation_config(model, tmp_path, repetition_penalty=2.0, no_repeat_ngram_size=1, do_sample=True,
                                              top_k=5, temperature=0.3)
    assert penalised.generation_config.repetition_penalty == 2.0
    for kw in ({"seed": 3}, {"do_sample": False}):
        ours = generate(penalised, tok, PROMPTS, max_new_tokens=8, batch_size=5, progress=False, **kw)
        clean = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=5, progress=False, **kw)
        assert ours.token_ids == clean.token_ids
    assert penalised.generation_config.repetition_penalty == 2.0  # restored after sampling
    # the saved settings do change greedy text when inherited, so the equality above is not vacuous
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    inherited = penalised.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=8)
    assert inherited[0, ids.shape[1]:].tolist() != clean.token_ids[0][:8]


def test_generate_order_determinism_and_state(tiny):
    model, tok = tiny
    model.train()
    side = tok.padding_side
    rng = torch.get_rng_state()
    out = _gen(model, tok, seed=1, batch_size=5)
    assert len(out) == len(PROMPTS) and all(isinstance(t, str) for t in out)
    assert model.training and tok.padding_side == side
    assert torch.equal(torch.get_rng_state(), rng)  # global RNG untouched
    assert _gen(model, tok, seed=1, batch_size=5) == out
    assert _gen(model, tok, seed=2, batch_size=5) != out

    # original order with mixed lengths: batched (sorted, left-padded) greedy text == one prompt per batch
    greedy = _gen(model, tok, do_sample=False, max_new_tokens=4)
    assert _gen(model, tok, do_sample=False, max_new_tokens=4, batch_size=1) == greedy
    assert len(set(greedy)) > 1
    model.eval()


def test_generate_lengths_and_chat(tiny):
    model, tok = tiny
    samples = generate(model, tok, PROMPTS[:2], max_new_tokens=5, progress=False, prompt_format="chat")
    assert len(samples.texts) == 2 and all(0 <= n <= 5 for n in samples.lengths)
    for ids, done, text in zip(samples.token_ids, samples.finished, samples.texts):
        # the sampled tokens end with eos exactly when the sample finished, and decode to the text
        assert (ids[-1:] == [tok.eos_token_id]) == done
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert generate(model, tok, [], progress=False).texts == []


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_samples_own_log_probs_are_the_models_at_temperature_one(tiny, temperature):
    model, tok = tiny
    prompts = [*PROMPTS[:3], "A much longer prompt, so that the batch is left-padded"]
    samples = generate(model, tok, prompts, max_new_tokens=6, temperature=temperature, batch_size=4, seed=1,
                       progress=False)
    assert [len(t) for t in samples.token_logps] == [len(t) for t in samples.token_ids]
    # one full forward pass per completion gives the same sums, whatever temperature the tokens were drawn at
    want = completion_logps(model, samples.prompt_ids, samples.token_ids, pad_id=tok.pad_token_id, batch_size=1)
    got = torch.stack([t.sum() for t in samples.token_logps])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_completion_logps_matches_full_forward(tiny):
    model, tok = tiny
    prompts, completions = ["The movie was", "I"], [" great fun", " think not, really"]
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    completion_ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in completions]
    got = completion_logps(model, prompt_ids, completion_ids, pad_id=tok.pad_token_id, batch_size=2)
    assert got.shape == (2,)
    for i in range(2):
        p, c = prompt_ids[i], completion_ids[i]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
        want = logp[torch.arange(len(p) - 1, ids.shape[1] - 1), torch.tensor(c)].sum()
        torch.testing.assert_close(got[i], want, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        completion_logps(model, prompt_ids, completion_ids[:1], pad_id=tok.pad_token_id)


def test_perplexity_is_exp_mean_nll(tiny):
    model, tok = tiny
    text = "The movie was great fun and I would watch it again."
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        nll = F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
    ppl = perplexity(model, tok, [text])
    assert math.isfinite(ppl)
    assert ppl == pytest.approx(math.exp(nll.item()), rel=1e-4)
    # several texts of different lengths in one padded batch: a token-weighted mean, not a mean of means
    assert math.isfinite(perplexity(model, tok, [text, "Short.", text + " More words here."], batch_size=3))
