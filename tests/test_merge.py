"""P-SACPO's merged policies (riskexp.stepwise.merge)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from riskexp.models import tiny_llama
from riskexp.stepwise.merge import merge_weights

REPO = Path(__file__).resolve().parents[1]


def test_merge_weights_interpolates_every_floating_tensor_and_keeps_integer_buffers():
    a = {"w": torch.tensor([0.0, 2.0]), "ids": torch.tensor([0, 1])}
    b = {"w": torch.tensor([4.0, 6.0]), "ids": torch.tensor([0, 1])}
    assert torch.equal(merge_weights(a, b, 0.25)["w"], torch.tensor([1.0, 3.0]))
    assert torch.equal(merge_weights(a, b, 0.0)["w"], a["w"]) and torch.equal(merge_weights(a, b, 1.0)["w"], b["w"])
    assert merge_weights(a, b, 0.5)["ids"] is a["ids"]
    half = {"w": torch.tensor([0.0, 2.0], dtype=torch.bfloat16)}
    assert merge_weights(half, {"w": torch.tensor([4.0, 6.0], dtype=torch.bfloat16)}, 0.5)["w"].dtype == torch.bfloat16


def test_policies_of_different_architectures_are_refused():
    with pytest.raises(ValueError, match=r"w has shape \(2,\) in merge.a and \(3,\) in merge.b"):
        merge_weights({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, 0.5)
    with pytest.raises(ValueError, match="differ in their tensors"):
        merge_weights({"w": torch.zeros(2)}, {"v": torch.zeros(2)}, 0.5)


def export(directory, seed):
    model, tokenizer = tiny_llama(init_seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_a_merge_sweep_evaluates_each_q_and_records_both_sources(tmp_path):
    a, b = export(tmp_path / "a", 1), export(tmp_path / "b", 2)
    result = subprocess.run(
        [sys.executable, "-m", "riskexp.merge", "--multirun", "model=tiny", "data=fixture", "logger=none",
         f"merge.a={a}", f"merge.b={b}", "merge.q=0.25,0.75", "eval.num_prompts=2", "eval.samples_per_prompt=2",
         "eval.max_new_tokens=4", "eval.num_heldout_texts=2", "eval.bootstrap_samples=20", "save_policy=true"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "RISKEXP_RUNS": str(tmp_path / "runs")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = sorted((json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("results.json")),
                     key=lambda r: r["q"])
    assert [(r["kind"], r["q"], r["merge_a"], r["merge_b"]) for r in records] == [
        ("merge", 0.25, str(a), str(b)), ("merge", 0.75, str(a), str(b))]
    assert all("eval/reward_mean" in r and "eval/delta/reward_mean" in r for r in records)
    # the exported merge is (1 - q) a + q b
    from riskexp.models import from_pretrained

    (quarter,) = [p.parent for p in (tmp_path / "runs").rglob("results.json") if json.loads(p.read_text())["q"] == 0.25]
    merged, _ = from_pretrained(str(quarter / "policy"))
    first, _ = from_pretrained(str(a))
    second, _ = from_pretrained(str(b))
    name, weight = next(iter(merged.state_dict().items()))
    expected = 0.75 * first.state_dict()[name].double() + 0.25 * second.state_dict()[name].double()
    assert torch.allclose(weight.double(), expected, atol=1e-6)
