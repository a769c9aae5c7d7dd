"""Preference data: loaders, Anthropic-HH parsing, tokenisation, collation and the Lightning DataModule."""

from riskexp.data.preference import (
    FIXTURE_PREFERENCES,
    IGNORE_INDEX,
    TRUNCATION_MODES,
    TRUNCATIONS,
    PreferenceDataModule,
    collate_pairs,
    load_hh_rlhf,
    load_preference_file,
    split_hh_transcript,
    tokenize_pair,
)

__all__ = [
    "FIXTURE_PREFERENCES",
    "IGNORE_INDEX",
    "TRUNCATION_MODES",
    "TRUNCATIONS",
    "PreferenceDataModule",
    "collate_pairs",
    "load_hh_rlhf",
    "load_preference_file",
    "split_hh_transcript",
    "tokenize_pair",
]
