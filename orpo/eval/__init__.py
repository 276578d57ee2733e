"""Evaluation: text normalisation and error rates, generation, preference metrics, WER evaluation, reports."""
