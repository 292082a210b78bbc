"""Paper settings for ImageNet-1k on a GPU cluster: ViT-L/16, 2 x 224 px global + 6 x 96 px local
views, lam 0.05, 1024 slices, bf16, AdamW 5e-4 / wd 0.05, warmup then cosine; 16 GPU workers.

Build the shards once on the cluster's shared storage:
    lejepa shards build path/to/imagenet/train s3://BUCKET/shards/in1k --format keep
then submit (see docs/cluster.md): lejepa pretrain pipelines/in1k_vitl.py
"""

from lejepa_platform.config import DataConfig, LossConfig, ModelConfig, RunConfig, TrackConfig, TrainConfig

IN1K_TRAIN_IMAGES = 1_281_167


def config() -> RunConfig:
    batch = 1024
    epochs = 100
    return RunConfig(
        model=ModelConfig(backbone="vit_large_patch16_224", proj_hidden_dim=2048, proj_layers=3, proj_dim=128,
                          proj_norm="batchnorm"),
        loss=LossConfig(lam=0.05, num_slices=1024),
        data=DataConfig(source="s3://BUCKET/shards/in1k", split="all", global_views=2, global_size=224,
                        global_scale=(0.3, 1.0), local_views=6, local_size=96, local_scale=(0.05, 0.3),
                        batch_size=batch, shuffle_buffer=4096),
        train=TrainConfig(steps=epochs * IN1K_TRAIN_IMAGES // batch, lr=5e-4, weight_decay=0.05, warmup_frac=0.1,
                          workers=16, use_gpu=True, cpus_per_worker=8, precision="bf16", log_every=50,
                          checkpoint_every=2000, keep_checkpoints=3, max_failures=10,
                          storage_path="s3://BUCKET/lejepa-runs"),
        track=TrackConfig(experiment="in1k"),
    )
