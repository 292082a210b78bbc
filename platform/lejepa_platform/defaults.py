"""The embedded default run: what `lejepa pretrain` does with no recipe.

A small ViT (4 blocks, width 96, patch 8) on 32 px views of builtin:fashion-mnist-10k, sized to
finish on 2 CPU cores within 5 minutes, start-up and evaluation included, and still beat random init
clearly. Up to 640 steps but a training-time budget too (`train.time_budget_s`): the speed of a
small shared machine varies from run to run, and with the budget a slower machine runs fewer steps
of the same whole schedule instead of running late. Two torch threads although the worker holds
one CPU: the data side needs only a fraction of a core for views this small, and a second thread
nearly doubles the step rate. No blur: at 28 px it erases the garment's detail. The measurements
behind these choices, and what was tried without a clear gain, are in docs/performance.md.
pipelines/default.py returns this same config, so the recipe and the built-in default cannot drift
apart.
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
