"""Evaluation: reconstruction and distribution metrics, and the evaluation/report entry point."""
