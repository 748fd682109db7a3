"""Evaluation: per-chunk scores, bits per byte with retrieval on and off, leakage filtering, online inputs and the evaluation job."""
