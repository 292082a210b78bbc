"""Ray Train worker loop, checkpoints and launch."""
