"""Speed and peak memory of the token-level terms (sequential KL + risk ratio), chunked vs one chunk.

    python benchmarks/bench_terms.py [--device cuda] [--pairs 8] [--length 512] [--vocab 49152]

Prints one JSON line per configuration. On CUDA, peak memory is `torch.cuda.max_memory_allocated`; on the CPU
the peak is not measured here (see tests/test_memory.py for the CPU bound).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from riskexp.logps import sequence_stats
from riskexp.risk import CVaR, Entropic, Mean


def measure(device, pairs, length, vocab, width, chunk_size, risk, repeats=3):
    torch.manual_seed(0)
    n = 2 * pairs
    head = torch.nn.Linear(width, vocab, bias=False, device=device)
    ref_head = torch.nn.Linear(width, vocab, bias=False, device=device).requires_grad_(False)
    hidden = torch.randn(n, length, width, device=device, requires_grad=True)
    ref_hidden = torch.randn(n, length, width, device=device)
    labels = torch.randint(0, vocab, (n, length), device=device)
    timings = []
    for _ in range(repeats + 1):  # the first repeat warms up kernels and the allocator
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        stats = sequence_stats(hidden, labels, ref_hidden, policy_head=head, ref_head=ref_head, vocab_terms=True,
                               vocab_risk=risk.over_vocab, chunk_size=chunk_size)
        (stats.seq_risk.sum() + stats.policy_logps.sum()).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    row = {"device": device, "pairs": pairs, "length": length, "vocab": vocab, "chunk_size": chunk_size,
           "risk": repr(risk), "seconds_fwd_bwd": round(min(timings[1:]), 4),
           "tokens_per_s": round(n * length / min(timings[1:]))}
    if device == "cuda":
        row["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", type=int, default=8 if torch.cuda.is_available() else 2)
    parser.add_argument("--length", type=int, default=512 if torch.cuda.is_available() else 64)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--width", type=int, default=576)  # SmolLM2-135M's hidden size
    args = parser.parse_args()
    for risk in (Mean(), CVaR(0.95), CVaR(0.95, "reference"), Entropic(1.0)):
        for chunk_size in (64, args.length):
            print(json.dumps(measure(args.device, args.pairs, args.length, args.vocab, args.width, chunk_size, risk)),
                  flush=True)


if __name__ == "__main__":
    main()
