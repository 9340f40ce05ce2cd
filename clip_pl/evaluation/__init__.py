"""Evaluation: metrics as clip_benchmark defines them, zero-shot tasks, suites of datasets, pictures."""
