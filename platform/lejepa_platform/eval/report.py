"""One evaluation report: the pretrained backbone against its baselines, plus embedding geometry.

A number without a baseline says little: the same backbone at random initialisation and the raw
pixels go through the same protocols on the same split, and the report states the lift.

JSON schema (version 4; keys are always present, null when not applicable):

    schema_version   4 (3 had one geometry block, of the pretrained backbone, and no
                     skipped / num_held_out; 2 had no features / feature_dim: its probes read the
                     embedding; 1 had no linear_lr: its linear probe used one fixed learning rate)
    backbone         timm model name (model.backbone)
    embed_dim        backbone feature dimension E
    features         what the probes of the backbones read (eval/features.py): "embedding" or
                     "embedding+patch_mean"
    feature_dim      their dimension D (E, or 2E for a ViT read as embedding+patch_mean)
    image_size       [H, W] of the evaluation images
    skipped          null, or one line saying why no labelled protocol ran (the label-free part
                     below is there either way)
    num_train        labelled training images the probes used (unlabelled rows, label -1, are dropped)
    num_test         labelled test images the probes used
    num_classes      largest label + 1
    num_held_out     held-out (test) images the geometry embedded, labelled or not
    protocols        protocols run, in the order given: any of "linear", "knn", "fewshot"; [] when skipped
    seed             seed of the random-init baseline, the linear probe and the few-shot draws
    models           {"pretrained": METRICS or null (no weights given, or skipped),
                      "random_init": METRICS or null, "raw_pixels": METRICS or null}
    lift             {"vs_random_init": LIFT or null, "vs_raw_pixels": LIFT or null}
    geometry         label-free, on the held-out embeddings (E dims, whatever the probes read):
                     {"pretrained": GEOMETRY or null (no weights given), "random_init": GEOMETRY}
    plots            {"spectrum": PNG path or null (both models' spectra), "patch_pca": PNG path or
                      null (ViTs only; the pretrained backbone, else the random one)};
                     written only when plots_dir is given

GEOMETRY: {"effective_rank": RankMe, "effective_rank_fraction": effective_rank / embed_dim,
           "sigreg": SIGReg statistic of the embeddings as they are (1024 slices),
           "top_eigenvalues": up to 10 largest covariance eigenvalues,
           "per_dim_variance": {"min", "median", "mean", "max"}}

METRICS holds accuracies in [0, 1] named by protocol:
    linear   -> "linear", "linear_lr"                   (offline linear probe; the learning rate
                                                        it chose on a validation split)
    knn      -> "knn_k20", "knn_k200"                   (cosine, temperature 0.07)
    fewshot  -> "fewshot_1shot_mean", "fewshot_1shot_std", "fewshot_10shot_mean", "fewshot_10shot_std"
                                                        (nearest class mean, 5 draws)
LIFT holds pretrained minus baseline for every METRICS key except the *_std and *_lr ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lejepa_platform.config import EvalConfig, ModelConfig
from lejepa_platform.errors import UserError
from lejepa_platform.eval.features import extract_features, is_vit, vit_patch_features
from lejepa_platform.eval.fewshot import fewshot_accuracy
from lejepa_platform.eval.geometry import covariance_spectrum, effective_rank, per_dim_variance, sigreg_statistic
from lejepa_platform.eval.knn import knn_accuracy
from lejepa_platform.eval.linear import linear_probe
from lejepa_platform.eval.plots import plot_patch_pca, plot_spectrum
from lejepa_platform.model import Encoder, build_encoder

SCHEMA_VERSION = 4
PROTOCOLS = ("linear", "knn", "fewshot")
KNN_KS = (20, 200)
FEWSHOT_SHOTS = (1, 10)
FEWSHOT_DRAWS = 5
PATCH_PCA_IMAGES = 4


class LabelledImages(Protocol):
    """What the report reads from an evaluation set (e.g. data.evalset.EvalSet)."""

    images: Any
    """(N, 3, S, S) uint8."""
    labels: Any
    """(N,) integers, -1 for unlabelled."""


Split = tuple[torch.Tensor, torch.Tensor]


def evaluation_report(model_cfg: ModelConfig, state_dict: dict | None, train: LabelledImages | None,
                      test: LabelledImages, *, protocols: Sequence[str] = ("linear", "knn"), seed: int = 0,
                      features: str = EvalConfig.features, device: str | torch.device = "cpu",
                      plots_dir: str | Path | None = None, skipped: str | None = None) -> dict:
    """Run `protocols` for the pretrained backbone (when `state_dict` is given: an `Encoder` state or
    the backbone's own), the random-init backbone and raw pixels, and the label-free geometry of
    both backbones on every `test` image; see the module doc for the schema.

    protocols=() gives the label-free part alone (`train` may then be None) and `skipped` says why
    in the report; a labelled protocol on data without labels is a UserError (`missing_labels`
    tells the caller beforehand).
    """
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise UserError(f"unknown evaluation protocol(s) {bad}: choose from {', '.join(PROTOCOLS)}")
    held_out, held_labels = _images(test, "test")
    if protocols:
        train_split = _labelled(train, "train")
        _labelled((held_out, held_labels), "test")  # UserError when the test data has no labels
        keep = held_labels >= 0
        test_labels = held_labels[keep]
        if train_split[0].shape[1:] != held_out.shape[1:]:
            raise UserError(f"train images are {_shape(train_split[0])} but test images {_shape(held_out)}: "
                            f"evaluation needs one image size and channel count")

    encoders: dict[str, Encoder] = {}
    if state_dict is not None:
        encoders["pretrained"] = _load(_seeded_encoder(model_cfg, seed), state_dict, model_cfg)
    encoders["random_init"] = _seeded_encoder(model_cfg, seed, optional_kwargs={"zero_init_last": False})
    embed_dim = encoders["random_init"].embed_dim
    embedders: dict[str, Any] = {**encoders, "raw_pixels": lambda x: x.flatten(1)} if protocols else dict(encoders)

    models: dict[str, dict[str, float] | None] = {"pretrained": None, "random_init": None, "raw_pixels": None}
    geometry: dict[str, dict[str, Any] | None] = {"pretrained": None, "random_init": None}
    spectra: dict[str, np.ndarray] = {}
    feature_dim = embed_dim
    for name, embedder in embedders.items():
        te = extract_features(embedder, held_out, features=features, device=device).to(device)
        if name in encoders:
            geometry[name], spectra[name.replace("_", " ")] = _geometry(te[:, :embed_dim], seed)
            feature_dim = int(te.shape[1])
        if protocols:
            tr = extract_features(embedder, train_split[0], features=features, device=device).to(device)
            models[name] = _protocol_metrics(protocols, (tr, train_split[1]), (te[keep.to(te.device)], test_labels),
                                             seed)

    plots: dict[str, str | None] = {"spectrum": None, "patch_pca": None}
    if plots_dir is not None:
        plots["spectrum"] = str(plot_spectrum(spectra, Path(plots_dir) / "spectrum.png"))
        backbone = encoders["pretrained" if "pretrained" in encoders else "random_init"].backbone
        if is_vit(backbone):
            sample = held_out[:PATCH_PCA_IMAGES]
            grids = vit_patch_features(backbone, sample, device=device)
            plots["patch_pca"] = str(plot_patch_pca(grids, list(sample), Path(plots_dir) / "patch_pca.png"))

    return {
        "schema_version": SCHEMA_VERSION,
        "backbone": model_cfg.backbone,
        "embed_dim": embed_dim,
        "features": features,
        "feature_dim": feature_dim,
        "image_size": list(held_out.shape[-2:]),
        "skipped": None if protocols else (skipped or "no labelled protocol was asked for"),
        "num_train": int(train_split[1].numel()) if protocols else None,
        "num_test": int(test_labels.numel()) if protocols else None,
        "num_classes": int(max(int(train_split[1].max()), int(test_labels.max())) + 1) if protocols else None,
        "num_held_out": int(held_out.shape[0]),
        "protocols": list(protocols),
        "seed": seed,
        "models": models,
        "lift": {"vs_random_init": _lift(models["pretrained"], models["random_init"]),
                 "vs_raw_pixels": _lift(models["pretrained"], models["raw_pixels"])},
        "geometry": geometry,
        "plots": plots,
    }


def missing_labels(split: LabelledImages, name: str) -> str | None:
    """Why `split` cannot feed a labelled protocol (it has no labelled image), or None when it can."""
    labels = np.asarray(split.labels)
    if labels.size and (labels >= 0).any():
        return None
    return f"the {name} data has no labels (all {labels.size} images are label -1)"


def _protocol_metrics(protocols: Sequence[str], train: Split, test: Split, seed: int) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for protocol in protocols:
        if protocol == "linear":
            probe = linear_probe(*train, *test, seed=seed)
            metrics["linear"], metrics["linear_lr"] = probe.accuracy, probe.lr
        elif protocol == "knn":
            for k in KNN_KS:
                metrics[f"knn_k{k}"] = knn_accuracy(*train, *test, k=k)
        else:
            results = fewshot_accuracy(*train, *test, shots=FEWSHOT_SHOTS, draws=FEWSHOT_DRAWS, seed=seed)
            for shots, result in results.items():
                metrics[f"fewshot_{shots}shot_mean"] = float(result["mean"])
                metrics[f"fewshot_{shots}shot_std"] = float(result["std"])
    return metrics


def _lift(pretrained: dict[str, float] | None, baseline: dict[str, float] | None) -> dict[str, float] | None:
    if pretrained is None or baseline is None:
        return None
    return {k: pretrained[k] - baseline[k] for k in pretrained if not k.endswith(("_std", "_lr"))}


def _geometry(feats: torch.Tensor, seed: int) -> tuple[dict[str, Any], np.ndarray]:
    eigs = covariance_spectrum(feats)
    variance = per_dim_variance(feats)
    rank = effective_rank(feats)
    return {
        "effective_rank": rank,
        "effective_rank_fraction": rank / feats.shape[1],
        "sigreg": sigreg_statistic(feats, seed=seed),
        "top_eigenvalues": [float(e) for e in eigs[:10]],
        "per_dim_variance": {"min": float(variance.min()), "median": float(np.median(variance)),
                             "mean": float(variance.mean()), "max": float(variance.max())},
    }, eigs


def _images(split: LabelledImages | tuple, name: str) -> Split:
    """(uint8 images, int64 labels) of a split; UserError when they do not fit together."""
    images, labels = split if isinstance(split, tuple) else (split.images, split.labels)
    images, labels = torch.as_tensor(images), torch.as_tensor(labels).long()
    if images.dim() != 4 or images.dtype != torch.uint8 or images.shape[0] != labels.shape[0]:
        raise UserError(f"{name} set must hold uint8 images (N, C, H, W) and N labels, got images "
                        f"{images.dtype} {tuple(images.shape)} and labels {tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise UserError(f"the {name} set has no images")
    return images, labels


def _labelled(split: LabelledImages | tuple | None, name: str) -> Split:
    """The split's labelled rows as (uint8 images, int64 labels); UserError when there are none."""
    if split is None:
        raise UserError(f"labelled protocols need a {name} set")
    images, labels = _images(split, name)
    keep = labels >= 0
    if not bool(keep.any()):
        raise UserError(f"the {name} data has no labels (all {labels.numel()} images are label -1); "
                        f"kNN, linear and few-shot evaluation need labelled images")
    return images[keep], labels[keep]


def _seeded_encoder(cfg: ModelConfig, seed: int, **kwargs: Any) -> Encoder:
    """build_encoder under `seed` without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_encoder(cfg, **kwargs)


def _load(encoder: Encoder, state_dict: dict, cfg: ModelConfig) -> Encoder:
    """Load an Encoder state (keys backbone.*, projector.*) or a bare backbone state, strictly."""
    target = encoder if any(k.startswith("backbone.") for k in state_dict) else encoder.backbone
    try:
        target.load_state_dict(state_dict)
    except RuntimeError as err:
        detail = re.sub(r"\s+", " ", str(err)).strip()
        raise UserError(f"the checkpoint does not fit model.backbone = {cfg.backbone!r} with backbone_kwargs "
                        f"{cfg.backbone_kwargs}: {detail[:300]}") from None
    return encoder


def _shape(images: torch.Tensor) -> str:
    return "x".join(str(s) for s in images.shape[1:])
