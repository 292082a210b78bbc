"""The reference minimal example's settings: ViT-S/8 at 128 px on Imagenette, 4 views of 128 px,
batch 256, lam 0.02, projector to 16 dims, 800 epochs on one GPU (reported: 90.7 % online probe).

Build the shards first (Imagenette's train folder has one subfolder per class):
    lejepa shards build path/to/imagenette2-160/train shards/imagenette --format keep
then: lejepa pretrain pipelines/imagenette_vits8.py [--set data.source=...]
"""

from lejepa_platform.config import DataConfig, LossConfig, ModelConfig, RunConfig, TrainConfig

IMAGENETTE_TRAIN_IMAGES = 9469


def config() -> RunConfig:
    batch = 256
    epochs = 800
    return RunConfig(
        model=ModelConfig(backbone="vit_small_patch8_224", backbone_kwargs={"img_size": 128},
                          proj_hidden_dim=2048, proj_layers=3, proj_dim=16, proj_norm="batchnorm"),
        loss=LossConfig(lam=0.02, num_slices=256),
        data=DataConfig(source="shards/imagenette", split="all", global_views=4, global_size=128,
                        global_scale=(0.08, 1.0), local_views=0, batch_size=batch, shuffle_buffer=2048),
        train=TrainConfig(steps=epochs * IMAGENETTE_TRAIN_IMAGES // batch, lr=2e-3, weight_decay=0.05,
                          warmup_frac=0.02, workers=1, use_gpu=True, cpus_per_worker=8, precision="bf16",
                          log_every=50, checkpoint_every=1000),
    )
