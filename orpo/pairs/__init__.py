"""Preference pairs from plain ASR data, mined from a model's n-best lists."""
