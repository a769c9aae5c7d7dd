"""The token-level terms never hold whole (N, T, V) float32 tensors: peak memory stays flat as T grows."""

import json
import os
import subprocess
import sys

import pytest

# One process per measurement: the peak RSS of a fresh interpreter is an honest high-water mark. A fixed
# mmap threshold makes glibc return freed tensors to the system at once; its adaptive threshold would
# otherwise keep freed chunks on the heap and let fragmentation, not live tensors, raise the peak.
SCRIPT = """
import json, resource, sys, torch
from riskexp.logps import sequence_stats
from riskexp.risk import Entropic
torch.manual_seed(0)
n, t, chunk, vocab, width = 4, int(sys.argv[1]), int(sys.argv[2]), 16384, 64
head, ref_head = torch.nn.Linear(width, vocab, bias=False), torch.nn.Linear(width, vocab, bias=False)
ref_head.requires_grad_(False)
hidden = torch.randn(n, t, width, requires_grad=True)
ref_hidden = torch.randn(n, t, width)
labels = torch.randint(0, vocab, (n, t))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stats = sequence_stats(hidden, labels, ref_hidden, policy_head=head, ref_head=ref_head, vocab_terms=True,
                       vocab_risk=Entropic(1.0).over_vocab, chunk_size=chunk)
(stats.seq_risk.sum() + stats.seq_kl.sum() + stats.policy_logps.sum()).backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_growth_mb": (after - before) / 1024}))
"""


def peak_growth_mb(length, chunk_size):
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(length), str(chunk_size)], capture_output=True,
                         text=True, check=True, timeout=300, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mb"]


@pytest.mark.slow
def test_peak_memory_of_token_level_terms_is_bounded_in_sequence_length():
    one_full_tensor_mb = 4 * 1024 * 16384 * 4 / 2**20  # (N, T, V) float32 at T = 1024: 256 MB
    short, long = peak_growth_mb(128, 64), peak_growth_mb(1024, 64)
    assert long - short < one_full_tensor_mb / 8, (short, long)
    # the same computation in one chunk holds several whole tensors: the measurement can tell the difference
    unchunked = peak_growth_mb(1024, 1024)
    assert unchunked - long > 2 * one_full_tensor_mb, (long, unchunked)
