"""Speed of PPO's pieces on a random-init model of SmolLM2-135M's architecture: rollouts and whole iterations.

    python benchmarks/bench_rl.py [--device cuda] [--batches 16 64 128] [--new-tokens 24] [--ppo-batch 16]

Rollouts (`riskexp.rl.rollout.rollout`: KV-cache sampling, the reference's per-token log-probs, the values) at
each batch size, every row drawing exactly `--new-tokens` tokens (min_new_tokens = max_new_tokens, so a random
model's early eos does not shorten the work): new tokens/s = B x T / seconds. Then whole PPO iterations of
`PPOModule` under a Lightning trainer at `--ppo-batch` episodes (4 epochs over one minibatch, Table 5's shape):
seconds per iteration and its split into rollout and update. One JSON line per measurement; the first rollout
and the first iteration warm up and are not counted. A random-init model needs no hub, so the same script runs
on a GPU machine without a network; its speed is the real architecture's, its samples are noise.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import time

import lightning as L
import torch

from riskexp.rl.data import PromptDataModule
from riskexp.rl.module import PPOModule
from riskexp.rl.rollout import rollout

# SmolLM2-135M(-Instruct)'s shape: 30 layers, width 576, 9 query / 3 key-value heads, MLP 1536, tied embeddings
SMOLLM2_135M = dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                    max_position_embeddings=8192)
OPENINGS = ["This movie was", "I walked out of the theater", "The acting in this film", "Honestly, the plot",
            "What a waste of", "The director clearly", "From the first scene", "I expected much more from"]


def smollm2_shaped(device: str, dtype: str):
    from riskexp.models import tiny_llama

    model, tokenizer = tiny_llama(**SMOLLM2_135M, dtype=dtype)
    return model.to(device), tokenizer


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def prompts_of(batch: int) -> list[str]:
    return [OPENINGS[i % len(OPENINGS)] for i in range(batch)]


def bench_rollouts(policy, reference, tokenizer, value_fn, device, batches, new_tokens, repeats):
    for batch in batches:
        timings = []
        for r in range(repeats + 1):
            synchronize(device)
            started = time.perf_counter()
            ro = rollout(policy, reference, tokenizer, prompts_of(batch), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, seed=r, value_fn=value_fn)
            synchronize(device)
            timings.append(time.perf_counter() - started)
        seconds = min(timings[1:])
        new = int(ro.response_mask.sum())
        row = {"bench": "rollout", "device": device, "batch": batch, "new_tokens": new_tokens,
               "seconds": round(seconds, 3), "new_tokens_per_s": round(new / seconds, 1)}
        if device == "cuda":
            row["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        print(json.dumps(row), flush=True)


class TimedPPO(PPOModule):
    """PPOModule that records how long each iteration's rollout and update take."""

    timings: list[dict[str, float]]

    def rollout(self, prompts):
        synchronize(self.device.type)
        started = time.perf_counter()
        ro = super().rollout(prompts)
        synchronize(self.device.type)
        self.timings.append({"rollout": time.perf_counter() - started})
        return ro

    def ppo_step(self, ro, scores, **extras):
        started = time.perf_counter()
        metrics = super().ppo_step(ro, scores, **extras)
        synchronize(self.device.type)
        self.timings[-1]["update"] = time.perf_counter() - started
        return metrics


def response_length_reward(prompts, texts):
    return torch.tensor([len(t) / 100.0 for t in texts])


def bench_iterations(policy, reference, tokenizer, device, batch, new_tokens, iterations):
    module = TimedPPO(policy, reference, tokenizer, reward=response_length_reward,
                      optimizer=functools.partial(torch.optim.AdamW, lr=1.41e-5),
                      sampling={"max_new_tokens": new_tokens, "min_new_tokens": new_tokens})
    module.timings = []
    data = PromptDataModule(prompts_of(batch * (iterations + 1)), batch_size=batch)
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    counted = module.timings[1:]
    rollout_s = min(t["rollout"] for t in counted)
    update_s = min(t["update"] for t in counted)
    row = {"bench": "ppo_iteration", "device": device, "batch": batch, "mini_batch": batch, "ppo_epochs": 4,
           "new_tokens": new_tokens, "iterations_counted": len(counted),
           "seconds_per_iteration": round(min(t["rollout"] + t["update"] for t in counted), 3),
           "rollout_s": round(rollout_s, 3), "update_s": round(update_s, 3)}
    if device == "cuda":
        row["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")  # never bf16 on this CPU
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--new-tokens", type=int, default=48 if cuda else 24)
    parser.add_argument("--ppo-batch", type=int, nargs="+", default=[16, 128] if cuda else [16])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    policy, tokenizer = smollm2_shaped(args.device, args.dtype)
    reference = copy.deepcopy(policy).requires_grad_(False)
    value_head = torch.nn.Linear(policy.config.hidden_size, 1, device=args.device, dtype=policy.dtype)

    def value_fn(input_ids, attention_mask):  # a shared-trunk value head's cost: one more trunk pass
        hidden = policy.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return value_head(hidden).squeeze(-1).float()

    with torch.no_grad():
        bench_rollouts(policy, reference, tokenizer, value_fn, args.device, args.batches, args.new_tokens,
                       args.repeats)
    for batch in args.ppo_batch:
        bench_iterations(policy, reference, tokenizer, args.device, batch, args.new_tokens, args.iterations)


if __name__ == "__main__":
    main()
