"""Benchmarks: train-step, input and scoring speed, FLOP counts, variants, the HuggingFace peer."""
