import json

import pytest
import torch

from riskexp.assets import load_prompt_file, minilm_path
from riskexp.scorers import (
    HubClassifier,
    MiniLMHead,
    NegatedScorer,
    ProfanityToxicity,
    SafetyCost,
    SafetyReward,
    Scorer,
    VaderSentiment,
    join_texts,
    main,
    stratified_split,
)

POS = "I loved this film, it was wonderful and moving."
NEG = "I hated this film, it was boring and awful."


def _check(out, n):
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float32 and out.shape == (n,) and out.device.type == "cpu"


# ------------------------------------------------------------------------------------------------ base behaviour


def test_join_texts():
    assert join_texts(["The movie was", "A ", "x"], [" great", "b", ""], "prompt+completion") == [
        "The movie was great",
        "A b",
        "x",
    ]
    assert join_texts(["The movie was"], ["great"], "prompt+completion") == ["The movie wasgreat"]  # exactly as sampled
    assert join_texts(["p"], ["c"], "completion") == ["c"]
    with pytest.raises(ValueError):
        join_texts(["p"], ["c"], "prompt")


@pytest.mark.parametrize(
    "scorer",
    [VaderSentiment(), ProfanityToxicity(), NegatedScorer(ProfanityToxicity()), SafetyReward(), SafetyCost()],
)
def test_length_mismatch_and_types(scorer):
    with pytest.raises(ValueError, match="2 prompts and 1 completions"):
        scorer(["a", "b"], ["c"])
    with pytest.raises(TypeError):
        scorer("a", "b")
    with pytest.raises(TypeError, match=r"completions\[1\]"):
        scorer(["a", "b"], ["c", None])
    _check(scorer([], []), 0)


def test_bad_constructor_args():
    with pytest.raises(ValueError):
        VaderSentiment(scored="prompt")
    with pytest.raises(ValueError):
        VaderSentiment(kind="penalty")
    with pytest.raises(ValueError):
        VaderSentiment(batch_size=0)


def test_batching_matches_unbatched():
    texts = [POS, NEG, "The film was long.", "Great acting!", "Terrible plot."] * 3
    a = VaderSentiment(batch_size=2)([""] * len(texts), texts)
    b = VaderSentiment(batch_size=1000)([""] * len(texts), texts)
    assert torch.equal(a, b)


def test_hydra_style_construction():
    from hydra.utils import instantiate

    r = instantiate(
        {
            "_target_": "riskexp.scorers.NegatedScorer",
            "inner": {"_target_": "riskexp.scorers.ProfanityToxicity", "batch_size": 8},
        }
    )
    assert isinstance(r, NegatedScorer) and isinstance(r.inner, ProfanityToxicity) and r.kind == "reward"


# ------------------------------------------------------------------------------------------------ VADER


def test_vader_ordering_shape_and_range():
    s = VaderSentiment()
    assert s.kind == "reward" and isinstance(s, Scorer)
    out = s(["", ""], [POS, NEG])
    _check(out, 2)
    assert out[0] > 0.3 and out[1] < -0.3
    assert (out.abs() <= 1).all()


def test_vader_prompt_plus_completion_vs_completion():
    prompts = ["I absolutely loved this wonderful movie and", "The film was"]
    comps = [" the ending", " long"]
    both = VaderSentiment()(prompts, comps)
    comp_only = VaderSentiment(scored="completion")(prompts, comps)
    assert both[0] > 0.5 and comp_only[0] == 0.0  # positive words live in the prompt
    assert both[1] == comp_only[1] == 0.0


# ------------------------------------------------------------------------------------------------ profanity


def test_profanity_ordering_and_negation():
    cost = ProfanityToxicity()
    assert cost.kind == "cost" and cost.scored == "completion"
    prompts = ["He said", "He said"]
    comps = ["you are a stupid fucking idiot", "have a nice day"]
    c = cost(prompts, comps)
    _check(c, 2)
    assert c[0] > 0.8 and c[1] < 0.3 and ((c >= 0) & (c <= 1)).all()
    r = NegatedScorer(cost)
    assert r.kind == "reward" and r.name == "neg_profanity_toxicity"
    rr = r(prompts, comps)
    _check(rr, 2)
    assert torch.equal(rr, -c) and rr[1] > rr[0]
    # completion-only by default: an offensive prompt does not make a benign completion costly
    assert cost(["you stupid fucking idiot"], ["have a nice day"])[0] < 0.3


# ------------------------------------------------------------------------------------------------ MiniLM head

HELD_OUT_POS = [
    "An absolute delight, I smiled the whole way through.",
    "Gorgeous, touching and brilliantly acted.",
]
HELD_OUT_NEG = ["A tedious, ugly mess that I regret watching.", "Dreadful acting and a plot full of holes."]


@pytest.fixture(scope="module")
def trained_head():
    rows = load_prompt_file("sentiment_labelled")
    head = MiniLMHead()
    stats = head.fit([r["text"] for r in rows], [r["label"] for r in rows], epochs=200, lr=0.05, seed=0)
    return head, stats


@pytest.mark.slow  # loads MiniLM (~3-5 s) and embeds 80 sentences; ~5-12 s on a busy 2-core machine
def test_minilm_head_train_save_load(trained_head, tmp_path):
    head, stats = trained_head
    assert stats["train_acc"] >= 0.95 and stats["n"] >= 60
    prompts = [""] * 4
    comps = HELD_OUT_POS + HELD_OUT_NEG
    z = head(prompts, comps)
    _check(z, 4)
    assert z[:2].min() > z[2:].max()
    assert (z[:2] > 0).all() and (z[2:] < 0).all()

    d = head.save(tmp_path / "head")
    assert sorted(p.name for p in d.iterdir()) == ["head.json", "head.safetensors"]
    assert (d / "head.safetensors").stat().st_size < 10_000  # head only, not the MiniLM weights
    meta = json.loads((d / "head.json").read_text())
    assert (
        meta["format"] == "riskexp.minilm_head.v1" and meta["dim"] == 384 and meta["train"]["epochs"] == 200
    )

    again = MiniLMHead.load(d)
    assert torch.equal(again(prompts, comps), z)
    prob = MiniLMHead(path=str(d), output="prob", batch_size=3)
    assert torch.allclose(prob(prompts, comps), torch.sigmoid(z), atol=1e-6)


def test_minilm_head_errors(tmp_path):
    with pytest.raises(RuntimeError, match="not fitted"):
        MiniLMHead()(["a"], ["b"])
    with pytest.raises(FileNotFoundError):
        MiniLMHead(path=tmp_path)
    with pytest.raises(ValueError):
        MiniLMHead(output="score")
    with pytest.raises(ValueError, match="positive_label"):
        MiniLMHead().fit(["a", "b"], ["pos", "neg"], embeddings=torch.zeros(2, 384))


def test_minilm_fit_deterministic_on_embeddings():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(20, 384, generator=g), dim=-1)
    y = [i % 2 for i in range(20)]
    a, b = MiniLMHead(), MiniLMHead()
    a.fit(["t"] * 20, y, epochs=30, seed=3, embeddings=x)
    b.fit(["t"] * 20, y, epochs=30, seed=3, embeddings=x)
    assert torch.equal(a.linear.weight, b.linear.weight)
    c = MiniLMHead()
    c.fit(["t"] * 20, ["p" if v else "n" for v in y], epochs=30, seed=3, embeddings=x, positive_label="p")
    assert torch.equal(a.linear.weight, c.linear.weight)


def test_minilm_head_save_load_roundtrip_without_embedder(tmp_path):
    # fast: fit on synthetic embeddings, round-trip the head files, compare logits on embeddings
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(30, 384, generator=g), dim=-1)
    y = [int(v > 0) for v in x[:, 0]]
    head = MiniLMHead(scored="completion", name="my_head", kind="cost")
    stats = head.fit(["t"] * 30, y, epochs=100, seed=0, embeddings=x)
    assert stats["train_acc"] >= 0.9
    d = head.save(tmp_path / "h")
    again = MiniLMHead(path=d)
    assert (again.scored, again.name, again.kind, again.output) == ("completion", "my_head", "cost", "logit")
    assert torch.equal(again.logits_from_embeddings(x), head.logits_from_embeddings(x))
    assert MiniLMHead(path=d, kind="reward").kind == "reward"  # explicit kwargs override saved metadata


def test_stratified_split():
    y = [0] * 10 + [1] * 30
    tr, va = stratified_split(y, 0.2, seed=0)
    assert sorted(tr + va) == list(range(40)) and not set(tr) & set(va)
    assert sum(y[i] for i in va) == 6 and len(va) == 8
    assert stratified_split(y, 0.2, seed=0) == (tr, va)


@pytest.mark.slow  # loads MiniLM unless an earlier test did
def test_train_minilm_cli(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = load_prompt_file("sentiment_labelled")[:40]  # 20 positive, 20 negative (interleaved)
    with data.open("w") as f:
        for r in rows:
            f.write(json.dumps({"sentence": r["text"], "y": "good" if r["label"] else "bad"}) + "\n")
    res = main(
        [
            "train-minilm",
            "--data",
            str(data),
            "--text-key",
            "sentence",
            "--label-key",
            "y",
            "--positive-label",
            "good",
            "--out",
            str(tmp_path / "out"),
            "--epochs",
            "150",
        ]
    )
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and res["n_val"] == 8 and res["val_acc"] >= 0.75
    head = MiniLMHead(path=tmp_path / "out")
    z = head([""] * 2, [HELD_OUT_POS[0], HELD_OUT_NEG[0]])
    assert z[0] > z[1]


# ------------------------------------------------------------------------------------------------ HubClassifier


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    d = tmp_path_factory.mktemp("tiny_clf")
    tok = AutoTokenizer.from_pretrained(minilm_path())  # BERT uncased WordPiece, 30522 tokens
    cfg = DistilBertConfig(
        vocab_size=tok.vocab_size,
        dim=32,
        n_layers=1,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=128,
        num_labels=3,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    DistilBertForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_hub_classifier_local(tiny_classifier):
    texts = ["a short one", "this one is a little bit longer than the others", "mid length text"]
    prompts = ["", "", ""]
    cols = [
        HubClassifier(str(tiny_classifier), label_index=i, scored="completion", max_length=64, batch_size=2)
        for i in range(3)
    ]
    outs = [c(prompts, texts) for c in cols]
    for o in outs:
        _check(o, 3)
    assert not torch.equal(outs[0], outs[1])

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    m = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    t = AutoTokenizer.from_pretrained(tiny_classifier)
    with torch.no_grad():
        ref = m(**t(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")).logits
    for i in range(3):
        assert torch.allclose(outs[i], ref[:, i], atol=1e-5)
    assert torch.equal(cols[1](prompts, texts), outs[1])  # deterministic
    neg = HubClassifier(tiny_classifier, label_index=-1, scored="completion")
    assert torch.allclose(neg(prompts, texts), outs[2], atol=1e-5)
    sm = HubClassifier(tiny_classifier, label_index=2, output="softmax", scored="completion")(prompts, texts)
    assert torch.allclose(sm, ref.softmax(-1)[:, 2], atol=1e-5)


def test_hub_classifier_prompt_plus_completion(tiny_classifier):
    c = HubClassifier(tiny_classifier, label_index=0)
    a = c(["The movie was"], [" great"])
    b = HubClassifier(tiny_classifier, label_index=0, scored="completion")(["x"], ["The movie was great"])
    assert torch.allclose(a, b, atol=1e-6)


def test_hub_classifier_errors(tiny_classifier, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HubClassifier(str(tmp_path / "no_such_model"), label_index=0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        HubClassifier(str(tmp_path), label_index=0)
    with pytest.raises(IndexError, match="label_index"):
        HubClassifier(tiny_classifier, label_index=5)(["a"], ["b"])
    with pytest.raises(ValueError):
        HubClassifier(tiny_classifier, label_index=0, output="probability")
