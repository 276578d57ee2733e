"""Preference objectives on the per-clip log-probabilities of the one-pass forward: one file per formula
(``orpo``, ``simpo``, ``cpo``, ``dpo`` with IPO), what they share in ``pairs``, the recipe's choice in
``objective``."""
