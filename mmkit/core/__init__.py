"""Shared core: model loaders, training loop, encoders, k-means. Nothing here knows a paper."""
