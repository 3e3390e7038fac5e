"""Evaluation: image generation for evaluation, pinned metrics and the report."""
