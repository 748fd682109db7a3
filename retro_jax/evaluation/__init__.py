"""Evaluation: per-chunk scores, bits per byte with retrieval on and off,
leakage filtering and its report, paired intervals, evaluation sets and
inputs, and the evaluation job."""
