"""Scaling-law sweep for a GPU cluster: ViT-T/S/B/L x SIGReg slices {256, 1024, 4096} x data fraction,
each trial on 4 GPUs with the paper's views. Rank models without labels by the LeJEPA loss.

Data fraction is a choice of shard directories built at 10 %, 30 % and 100 % of the images
(`lejepa shards build` on subsets); point them at your storage.

    lejepa sweep sweeps/scaling.py && lejepa analyze --experiment scaling
"""

import pathlib

from lejepa_platform.config import RunConfig, SweepConfig
from lejepa_platform.overrides import set_values
from lejepa_platform.recipes import load_recipe

PAPER_RUN = pathlib.Path(__file__).resolve().parent.parent / "pipelines" / "in1k_vitl.py"


def config() -> SweepConfig:
    base = set_values(load_recipe(str(PAPER_RUN), RunConfig), {"train.workers": 4, "train.steps": 20_000, "data.batch_size": 512,
                                     "train.checkpoint_every": 2000, "track.experiment": "scaling"})
    return SweepConfig(
        base=base,
        space={
            "model.backbone": {"grid": ["vit_tiny_patch16_224", "vit_small_patch16_224",
                                        "vit_base_patch16_224", "vit_large_patch16_224"]},
            "loss.num_slices": {"grid": [256, 1024, 4096]},
            "data.source": {"grid": ["s3://BUCKET/shards/in1k-10pct", "s3://BUCKET/shards/in1k-30pct",
                                     "s3://BUCKET/shards/in1k"]},
        },
        scheduler="fifo", name="scaling",
    )
