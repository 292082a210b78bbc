"""The embedded default run: what `lejepa pretrain` does with no recipe.

A small ViT (4 blocks, width 96, patch 8) on 32 px views of builtin:fashion-mnist-10k, sized to
finish on 2 CPU cores within 5 minutes, start-up and evaluation included, and still beat random init
clearly. Up to 640 steps, but at most 200 s of training (`train.time_budget_s`): about 65 s of
start-up (~25 s until the first step) and evaluation (~30 s) come on top, and this 2-core VM's speed
varies (the plain loop of `lejepa bench step` ran at 419 to 547 img/s within two hours), so a fixed
step count alone finished in 4 min 34 s on one run and 5 min 40 s on another. On a fast machine the
budget hardly binds (640 steps took about 200 s in the fastest runs); on a slow one the schedule
reaches its end in fewer steps. Two torch threads although the worker holds one CPU: views of 28 px
images cost Ray Data about 0.6 ms of CPU each, so the data side needs a fifth of a core on average,
and the step runs at about 440 img/s instead of about 210 with one thread. No blur: at 28 px it
erases the garment's detail. Tried at this budget without a clear gain (single-process runs of the
same code, one seed each, within the +-0.7 points that runs differ by): 2 views and twice the steps,
batch 64 and twice the steps, lam 0.1, crop scale (0.4, 1), no solarisation, projector to 16 dims, 2
global + 4 local 16 px views. pipelines/default.py returns this same config, so the recipe and the
built-in default cannot drift apart.
"""

from __future__ import annotations

from lejepa_platform.config import DataConfig, LossConfig, ModelConfig, RunConfig, TrainConfig


def default_run_config() -> RunConfig:
    return RunConfig(
        model=ModelConfig(
            backbone="vit_tiny_patch16_224",
            backbone_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3},
            proj_hidden_dim=512, proj_layers=3, proj_dim=64, proj_norm="batchnorm",
        ),
        loss=LossConfig(lam=0.05, num_slices=256),
        data=DataConfig(source="builtin:fashion-mnist-10k", split="train", global_views=4, global_size=32,
                        global_scale=(0.25, 1.0), local_views=0, blur_p=0.0, batch_size=128, shuffle_buffer=1024),
        train=TrainConfig(steps=640, time_budget_s=200.0, lr=2e-3, weight_decay=0.05, warmup_frac=0.1, workers=1,
                          cpus_per_worker=1.0, torch_threads=2, log_every=10, checkpoint_every=80,
                          max_failures=2),
    )
