"""Reward and cost models (Safe RLHF): a causal-LM trunk with a scalar score head, trained on preference pairs,
exported in safe-rlhf's score-model layout so that `riskexp.scorers.SafeRLHFScorer` loads them."""
