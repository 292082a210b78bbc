"""Image shards, multi-crop views and the pipeline that streams them over Ray."""
