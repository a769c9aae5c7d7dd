"""riskexp: Hydra-configured experiments for risk-aware alignment of language models."""

__version__ = "0.1.0"
