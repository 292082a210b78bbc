"""The embedded default (what `lejepa pretrain` runs with no recipe): a 4-block ViT on
builtin:fashion-mnist-10k, a few minutes on 2 CPU cores. Start your own recipe from a copy."""

from lejepa_platform.config import RunConfig
from lejepa_platform.defaults import default_run_config


def config() -> RunConfig:
    return default_run_config()
