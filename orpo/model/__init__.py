"""Model: loading, PEFT adapters, the one-pass ORPO forward and its two-pass reference, attention, recompute."""
