"""Image shards, multi-crop views and the Ray Data pipeline."""
