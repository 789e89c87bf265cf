"""Flax ports of pretrained networks used by losses and metrics.

Weights come from local files, never downloaded.
"""
