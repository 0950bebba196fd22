"""Evaluation: a published dataset measured against held-out real images (segmentor, metrics, plots)."""
