"""One evaluation report: the pretrained backbone against its baselines, plus embedding geometry.

A number without a baseline says little: the same backbone at random initialisation and the raw
pixels go through the same protocols on the same split, and the report states the lift.

The report is built from three parts, each its own function: the labelled protocols (probes on
train / test features), the label-free geometry of the held-out embeddings, and the plots. The
features come from images (`evaluation_report`: every backbone and the raw pixels) or from an
embeddings directory `lejepa embed` wrote (`embeddings_report`: the pretrained backbone only, so
its baselines are null).

JSON schema (version 5; keys are always present, null when not applicable):

    schema_version   5 (4 had no features_from, and its geometry always held random_init; 3 had one
                     geometry block, of the pretrained backbone, and no skipped / num_held_out; 2 had
                     no features / feature_dim: its probes read the embedding; 1 had no linear_lr:
                     its linear probe used one fixed learning rate)
    features_from    "images" (features computed here) or "embeddings" (read from `lejepa embed`'s
                     output: models.random_init, models.raw_pixels, geometry.random_init, lift and
                     plots.patch_pca are then null)
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
                     {"pretrained": GEOMETRY or null (no weights given), "random_init": GEOMETRY or
                      null (features from embeddings)}
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

import dataclasses
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

SCHEMA_VERSION = 5
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
    check_protocols(protocols)
    held_out, held_labels = _images(test, "test")
    train_images, sides = _labelled_images(train, held_out, held_labels) if protocols else (None, None)
    encoders = {"pretrained": load_encoder(model_cfg, state_dict, seed)} if state_dict is not None else {}
    encoders["random_init"] = _seeded_encoder(model_cfg, seed, optional_kwargs={"zero_init_last": False})
    embedders: dict[str, Any] = {**encoders, "raw_pixels": _raw_pixels} if protocols else dict(encoders)

    def embed(embedder: Any, images: torch.Tensor) -> torch.Tensor:
        return extract_features(embedder, images, features=features, device=device).to(device)

    held = {name: embed(embedder, held_out) for name, embedder in embedders.items()}
    models = {name: labelled_metrics(protocols, embed(embedder, train_images), held[name], sides, seed)
              for name, embedder in embedders.items()} if sides else {}
    embed_dim = encoders["random_init"].embed_dim
    geometry, spectra = geometry_part({name: held[name][:, :embed_dim] for name in encoders}, seed)
    shown = encoders["pretrained" if "pretrained" in encoders else "random_init"].backbone
    plots = plots_part(spectra, plots_dir, patches=(shown, held_out[:PATCH_PCA_IMAGES], device))
    facts = Facts(model_cfg.backbone, embed_dim, features, int(held["random_init"].shape[1]),
                  list(held_out.shape[-2:]), "images")
    return _report(facts, protocols, seed, sides, models, int(held_out.shape[0]), geometry, plots, skipped)


def embeddings_report(facts: Facts, train: Split | None, test: Split, *, protocols: Sequence[str], seed: int,
                      plots_dir: str | Path | None = None, skipped: str | None = None) -> dict:
    """The report of the pretrained backbone from features computed before (`lejepa embed`):
    `train` / `test` are (features (N, facts.feature_dim), labels with -1 for unlabelled); the
    baselines, which need the images, are null. Same protocols and geometry as `evaluation_report`."""
    check_protocols(protocols)
    test_feats, test_labels = torch.as_tensor(test[0]), torch.as_tensor(test[1]).long()
    models, sides = {}, None
    if protocols:
        if train is None:
            raise UserError("labelled protocols need a train set")
        train_feats, train_labels = _keep_labelled(torch.as_tensor(train[0]), torch.as_tensor(train[1]).long(), "train")
        _keep_labelled(test_feats, test_labels, "test")
        sides = _sides(train_labels, test_labels)
        models = {"pretrained": labelled_metrics(protocols, train_feats, test_feats, sides, seed)}
    geometry, spectra = geometry_part({"pretrained": test_feats[:, :facts.embed_dim]}, seed)
    plots = plots_part(spectra, plots_dir, patches=None)
    return _report(facts, protocols, seed, sides, models, int(test_feats.shape[0]), geometry, plots, skipped)


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the report says about the features: backbone, its embedding size E, what the probes read
    and its size D, the evaluation image size, and where the features came from."""

    backbone: str
    embed_dim: int
    features: str
    feature_dim: int
    image_size: list[int]
    features_from: str


@dataclasses.dataclass(frozen=True)
class Sides:
    """The labels the probes use: the train rows' labels, which test rows are labelled, and theirs."""

    train_labels: torch.Tensor
    test_keep: torch.Tensor
    test_labels: torch.Tensor


def check_protocols(protocols: Sequence[str]) -> None:
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise UserError(f"unknown evaluation protocol(s) {bad}: choose from {', '.join(PROTOCOLS)}")


def labelled_metrics(protocols: Sequence[str], train_feats: torch.Tensor, test_feats: torch.Tensor, sides: Sides,
                     seed: int) -> dict[str, float]:
    """The labelled protocols on one feature set: all its train rows, the labelled test rows."""
    test = (test_feats[sides.test_keep.to(test_feats.device)], sides.test_labels)
    return _protocol_metrics(protocols, (train_feats, sides.train_labels), test, seed)


def geometry_part(held: dict[str, torch.Tensor], seed: int) -> tuple[dict[str, dict | None], dict[str, np.ndarray]]:
    """Label-free geometry of each model's held-out embeddings (E dims): ({model: GEOMETRY or None},
    {plot label: covariance spectrum})."""
    geometry: dict[str, dict | None] = {"pretrained": None, "random_init": None}
    spectra: dict[str, np.ndarray] = {}
    for name, feats in held.items():
        geometry[name], spectra[name.replace("_", " ")] = _geometry(feats, seed)
    return geometry, spectra


def plots_part(spectra: dict[str, np.ndarray], plots_dir: str | Path | None,
               patches: tuple[torch.nn.Module, torch.Tensor, str | torch.device] | None) -> dict[str, str | None]:
    """The spectrum plot, and the patch-PCA picture of (backbone, images, device) for a ViT; written
    only when plots_dir is given."""
    plots: dict[str, str | None] = {"spectrum": None, "patch_pca": None}
    if plots_dir is None:
        return plots
    plots["spectrum"] = str(plot_spectrum(spectra, Path(plots_dir) / "spectrum.png"))
    if patches is not None and is_vit(patches[0]):
        backbone, sample, device = patches
        grids = vit_patch_features(backbone, sample, device=device)
        plots["patch_pca"] = str(plot_patch_pca(grids, list(sample), Path(plots_dir) / "patch_pca.png"))
    return plots


def load_encoder(model_cfg: ModelConfig, state_dict: dict, seed: int = 0) -> Encoder:
    """The pretrained encoder: an `Encoder` state or a bare backbone state loaded strictly (UserError
    when it does not fit model_cfg)."""
    return _load(_seeded_encoder(model_cfg, seed), state_dict, model_cfg)


def _report(facts: Facts, protocols: Sequence[str], seed: int, sides: Sides | None, models: dict,
            num_held_out: int, geometry: dict, plots: dict, skipped: str | None) -> dict:
    """The report document (module doc) from its parts."""
    full = {"pretrained": None, "random_init": None, "raw_pixels": None, **models}
    counts = ({"num_train": int(sides.train_labels.numel()), "num_test": int(sides.test_labels.numel()),
               "num_classes": int(max(int(sides.train_labels.max()), int(sides.test_labels.max())) + 1)}
              if sides else {"num_train": None, "num_test": None, "num_classes": None})
    return {"schema_version": SCHEMA_VERSION, "features_from": facts.features_from, "backbone": facts.backbone,
            "embed_dim": facts.embed_dim, "features": facts.features, "feature_dim": facts.feature_dim,
            "image_size": facts.image_size,
            "skipped": None if protocols else (skipped or "no labelled protocol was asked for"), **counts,
            "num_held_out": num_held_out, "protocols": list(protocols), "seed": seed, "models": full,
            "lift": {"vs_random_init": _lift(full["pretrained"], full["random_init"]),
                     "vs_raw_pixels": _lift(full["pretrained"], full["raw_pixels"])},
            "geometry": geometry, "plots": plots}


def _labelled_images(train: LabelledImages | None, held_out: torch.Tensor,
                     held_labels: torch.Tensor) -> tuple[torch.Tensor, Sides]:
    """The labelled train images and the labels of both sides; UserError when a side has no labels
    or the image sizes differ."""
    train_images, train_labels = _labelled(train, "train")
    _labelled((held_out, held_labels), "test")  # UserError when the test data has no labels
    if train_images.shape[1:] != held_out.shape[1:]:
        raise UserError(f"train images are {_shape(train_images)} but test images {_shape(held_out)}: "
                        f"evaluation needs one image size and channel count")
    return train_images, _sides(train_labels, held_labels)


def _sides(train_labels: torch.Tensor, held_labels: torch.Tensor) -> Sides:
    """Sides from every train row's label (labelled) and the held-out labels (-1 for unlabelled)."""
    keep = held_labels >= 0
    return Sides(train_labels, keep, held_labels[keep])


def _raw_pixels(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1)


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
    return _keep_labelled(*_images(split, name), name)


def _keep_labelled(rows: torch.Tensor, labels: torch.Tensor, name: str) -> Split:
    """(rows, labels) of the labelled rows (label >= 0); UserError when there are none."""
    keep = labels >= 0
    if not bool(keep.any()):
        raise UserError(f"the {name} data has no labels (all {labels.numel()} images are label -1); "
                        f"kNN, linear and few-shot evaluation need labelled images")
    return rows[keep], labels[keep]


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
