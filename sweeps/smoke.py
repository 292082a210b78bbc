"""CPU smoke sweep: 2 backbones x 2 SIGReg slice counts, tiny budgets, a few minutes on 2 cores.

    lejepa sweep sweeps/smoke.py && lejepa analyze --experiment smoke
"""

from lejepa_platform.config import SweepConfig
from lejepa_platform.defaults import default_run_config
from lejepa_platform.overrides import set_values


def config() -> SweepConfig:
    base = set_values(default_run_config(), {
        "model.backbone_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2},
        "model.proj_hidden_dim": 128, "model.proj_dim": 32,
        "data.global_views": 2, "data.batch_size": 32,
        "train.steps": 30, "train.time_budget_s": 0.0, "train.log_every": 5, "train.checkpoint_every": 15,
        "train.cpus_per_worker": 0.5, "train.torch_threads": 1,
        "eval.protocols": ("knn",),
        "track.experiment": "smoke",
    })
    return SweepConfig(
        base=base,
        space={"model.backbone": {"grid": ["vit_tiny_patch16_224", "vit_small_patch16_224"]},
               "loss.num_slices": {"grid": [64, 256]}},
        scheduler="fifo", name="smoke",
    )
