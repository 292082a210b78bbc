"""Evaluation protocols on synthetic features with known structure, and the report's schema.

Ceilings used below. Symmetric label noise replaces a label, with probability p, by a class drawn
uniformly from all C classes (possibly the same one), so a label is wrong with probability
q = p (C - 1) / C. A perfect classifier scored on noisy TEST labels gets 1 - q. A 1-NN classifier
trained on noisy TRAIN labels copies its neighbour's label, so on clean test labels it also gets
1 - q, while a majority over many same-cluster neighbours (k = 200) or a linear probe recovers the
clean classes. Labels independent of the features give chance, 1 / C.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

from lejepa_platform.config import ModelConfig
from lejepa_platform.errors import UserError
from lejepa_platform.eval import knn as knn_module
from lejepa_platform.eval import report as report_module
from lejepa_platform.eval.features import extract_features, probe_embedder, vit_patch_features
from lejepa_platform.eval.fewshot import fewshot_accuracy
from lejepa_platform.eval.knn import knn_accuracy
from lejepa_platform.eval import linear as linear_module
from lejepa_platform.eval.linear import linear_probe
from lejepa_platform.eval.report import evaluation_report
from lejepa_platform.model import build_encoder
from lejepa_platform.schedule import warmup_cosine

pytestmark = pytest.mark.unit

C, E = 5, 16


def _clusters(n, seed, spread=10.0):
    """n points around C well-separated centres (fixed by seed 0) with unit noise."""
    centres = torch.randn(C, E, generator=torch.Generator().manual_seed(0)) * spread
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n,), generator=gen)
    return centres[labels] + torch.randn(n, E, generator=gen), labels


def _noisy(labels, p, seed):
    """Symmetric noise: each label replaced, with probability p, by a uniform class."""
    gen = torch.Generator().manual_seed(seed)
    replace = torch.rand(labels.shape, generator=gen) < p
    return torch.where(replace, torch.randint(0, C, labels.shape, generator=gen), labels)


TRAIN = _clusters(1000, seed=1)
TEST = _clusters(2000, seed=2)
P = 0.3
Q = P * (C - 1) / C  # probability that a noisy label is wrong


def test_separable_clusters_are_classified_almost_perfectly():
    assert knn_accuracy(*TRAIN, *TEST, k=20) > 0.98
    assert knn_accuracy(*TRAIN, *TEST, k=200) > 0.98
    assert linear_probe(*TRAIN, *TEST, epochs=20).accuracy > 0.98
    shots = fewshot_accuracy(*TRAIN, *TEST, shots=(1, 10), draws=3)
    assert shots[10]["mean"] > 0.98 and shots[1]["mean"] > 0.9


def test_noisy_test_labels_cap_a_perfect_classifier_at_one_minus_q():
    noisy = _noisy(TEST[1], P, seed=3)
    agree = float((noisy == TEST[1]).float().mean())
    assert agree == pytest.approx(1 - Q, abs=0.03)
    for acc in (knn_accuracy(*TRAIN, TEST[0], noisy, k=20), linear_probe(*TRAIN, TEST[0], noisy, epochs=20).accuracy):
        # the classifier is right on every clean label, so it scores exactly the agreeing fraction
        assert acc == pytest.approx(agree, abs=2e-3)
        assert acc == pytest.approx(1 - Q, abs=0.03)


def test_noisy_train_labels_cap_1nn_but_not_majority_votes():
    noisy = _noisy(TRAIN[1], P, seed=4)
    assert knn_accuracy(TRAIN[0], noisy, *TEST, k=1) == pytest.approx(1 - Q, abs=0.04)
    assert knn_accuracy(TRAIN[0], noisy, *TEST, k=200) > 0.98
    assert linear_probe(TRAIN[0], noisy, *TEST, epochs=20).accuracy > 0.97


def test_labels_independent_of_features_give_chance():
    gen = torch.Generator().manual_seed(5)
    x_train, x_test = torch.randn(1000, E, generator=gen), torch.randn(2000, E, generator=gen)
    y_train, y_test = torch.randint(0, C, (1000,), generator=gen), torch.randint(0, C, (2000,), generator=gen)
    accs = [knn_accuracy(x_train, y_train, x_test, y_test, k=20),
            linear_probe(x_train, y_train, x_test, y_test, epochs=10).accuracy,
            fewshot_accuracy(x_train, y_train, x_test, y_test, shots=(10,), draws=3)[10]["mean"]]
    for acc in accs:
        assert acc == pytest.approx(1 / C, abs=0.04)  # 4+ binomial standard deviations


def _knn_reference(train, train_labels, test, k, temperature):
    """Straightforward per-row weighted vote."""
    train_n = train / train.norm(dim=1, keepdim=True)
    preds = []
    for row in test:
        sims = train_n @ (row / row.norm())
        top = sims.argsort(descending=True)[:k]
        votes = np.zeros(C)
        for i in top.tolist():
            votes[int(train_labels[i])] += float(torch.exp(sims[i] / temperature))
        preds.append(int(np.argmax(votes)))
    return torch.tensor(preds)


def test_knn_matches_a_plain_reference_across_chunks(monkeypatch):
    gen = torch.Generator().manual_seed(6)
    x_train, x_test = torch.randn(60, 4, generator=gen), torch.randn(25, 4, generator=gen)
    y_train, y_test = torch.randint(0, C, (60,), generator=gen), torch.randint(0, C, (25,), generator=gen)
    expected = int((_knn_reference(x_train, y_train, x_test, 7, 0.5) == y_test).sum()) / 25
    monkeypatch.setattr(knn_module, "CHUNK_ROWS", 4)
    assert knn_accuracy(x_train, y_train, x_test, y_test, k=7, temperature=0.5) == expected
    # k above the training size is capped: all 60 rows vote
    expected_all = int((_knn_reference(x_train, y_train, x_test, 60, 0.5) == y_test).sum()) / 25
    assert knn_accuracy(x_train, y_train, x_test, y_test, k=500, temperature=0.5) == expected_all


def test_linear_probe_is_deterministic_and_leaves_global_rng_alone():
    noisy = _noisy(TRAIN[1], 0.8, seed=7)
    state = torch.get_rng_state()
    a = linear_probe(TRAIN[0], noisy, *TEST, epochs=3, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    assert linear_probe(TRAIN[0], noisy, *TEST, epochs=3, seed=11) == a


def test_batched_learning_rates_train_exactly_like_separate_probes():
    x, y = TRAIN[0][:300], TRAIN[1][:300]
    settings = dict(classes=C, epochs=2, weight_decay=1e-6, batch_size=64, seed=3)
    weight, bias = linear_module._train(x, y, [1e-3, 1e-1], **settings)
    for r, lr in enumerate([1e-3, 1e-1]):
        alone_w, alone_b = linear_module._train(x, y, [lr], **settings)
        torch.testing.assert_close(weight[r], alone_w[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bias[r], alone_b[0], rtol=1e-5, atol=1e-6)


def test_probe_training_matches_nn_linear_with_torch_adamw():
    """The written-out softmax gradient and AdamW update against autograd + torch.optim.AdamW on
    the same mini-batches and the same warmup + cosine learning rates."""
    x, y = TRAIN[0][:300], _noisy(TRAIN[1][:300], 0.3, seed=4)
    lr, weight_decay, batch_size, epochs, seed = 3e-2, 1e-2, 64, 3, 5
    weight, bias = linear_module._train(x, y, [lr], classes=C, epochs=epochs, weight_decay=weight_decay,
                                        batch_size=batch_size, seed=seed)
    probe = torch.nn.Linear(E, C)
    torch.nn.init.zeros_(probe.weight), torch.nn.init.zeros_(probe.bias)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * math.ceil(300 / batch_size)
    warmup = max(1, int(linear_module.WARMUP_FRACTION * total))
    generator, step = torch.Generator().manual_seed(seed), 0
    for _ in range(epochs):
        order = torch.randperm(300, generator=generator)
        for start in range(0, 300, batch_size):
            rows = order[start:start + batch_size]
            optimizer.param_groups[0]["lr"] = lr * warmup_cosine(step, warmup, total)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(probe(x[rows]), y[rows]).backward()
            optimizer.step()
            step += 1
    torch.testing.assert_close(weight[0], probe.weight.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bias[0], probe.bias.detach(), rtol=1e-4, atol=1e-5)


def _shared_noise(n, seed):
    """Two classes: column 0 = label signal (+-1) + large noise, column 1 = the same noise. The class
    means differ along column 0 only, which classifies poorly; column 0 - column 1 is exact."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=gen)
    noise = 10 * torch.randn(n, generator=gen)
    return torch.stack([(2 * labels - 1) + noise, noise], 1), labels


def test_learning_rate_is_chosen_on_held_out_training_rows():
    # at 1e-5 the weights stay tiny and point along the class means (barely above chance);
    # at 1e-1 the probe finds column 0 - column 1
    train, test = _shared_noise(1000, 1), _shared_noise(1000, 2)
    assert linear_probe(*train, *test, lrs=(1e-5,), epochs=20).accuracy < 0.6
    result = linear_probe(*train, *test, lrs=(1e-5, 1e-1), epochs=20)
    assert result.lr == 1e-1 and result.accuracy > 0.97
    with pytest.raises(ValueError, match="learning rates > 0"):
        linear_probe(*TRAIN, *TEST, lrs=())


def test_fewshot_with_every_example_drawn_is_the_exact_class_mean_rule():
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    y = torch.tensor([0, 0, 1, 1])
    test_x = torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.62, 0.78], [0.7, 0.7]])
    # normalised means: class 0 -> (0.9, 0.3)/|.|, class 1 -> (-0.3, 0.9)/|.|; the last row is nearer class 0
    result = fewshot_accuracy(x, y, test_x, torch.tensor([0, 1, 0, 1]), shots=(2,), draws=4)
    assert result[2]["accuracies"] == [0.75] * 4
    assert result[2]["mean"] == 0.75 and result[2]["std"] == 0.0


def test_fewshot_draws_are_seeded_and_spread_is_reported():
    a = fewshot_accuracy(*TRAIN, TEST[0], _noisy(TEST[1], 0.5, seed=8), shots=(1,), draws=4, seed=3)
    b = fewshot_accuracy(*TRAIN, TEST[0], _noisy(TEST[1], 0.5, seed=8), shots=(1,), draws=4, seed=3)
    assert a == b
    assert a[1]["std"] == pytest.approx(float(np.std(a[1]["accuracies"], ddof=1)))


def test_fewshot_needs_enough_examples_per_class():
    y = torch.tensor([0, 0, 1, 1, 1])
    with pytest.raises(UserError, match="3-shot evaluation needs >= 3 labelled training images per class; "
                                        "class 0 has 2"):
        fewshot_accuracy(torch.randn(5, 3), y, torch.randn(2, 3), torch.tensor([0, 1]), shots=(3,))


@pytest.mark.parametrize("protocol", [knn_accuracy, linear_probe, fewshot_accuracy])
def test_protocols_reject_bad_input(protocol):
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    with pytest.raises(UserError, match="needs labels, but 6 of 6 train images are unlabelled"):
        protocol(x, torch.full((6,), -1), x, y)
    with pytest.raises(UserError, match="feature dimension mismatch: train features have 3 dimensions, "
                                        "test features 4"):
        protocol(x, y, torch.randn(6, 4), y)
    with pytest.raises(UserError, match="test labels must be integers"):
        protocol(x, y, x, y.float())


# ---- features and the report (tiny encoders, tiny images) ------------------------------------

TINY_VIT = ModelConfig(backbone="vit_tiny_patch16_224",
                       backbone_kwargs={"img_size": 16, "patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2},
                       proj_hidden_dim=16, proj_layers=2, proj_dim=8)
TINY_RESNET = ModelConfig(backbone="resnet18", backbone_kwargs={"channels": [8, 8, 16, 16], "stem_width": 8},
                          proj_hidden_dim=16, proj_layers=2, proj_dim=8)


@dataclasses.dataclass
class Split:
    images: np.ndarray
    labels: np.ndarray


def _image_split(n, seed, size=16):
    """Class c images are brighter in channel c % 3: a signal every encoder can pick up."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = rng.integers(0, 120, size=(n, 3, size, size)).astype(np.uint8)
    images[np.arange(n), labels] += 120
    return Split(images, labels.astype(np.int64))


def test_extract_features_batches_like_one_call_and_restores_mode():
    torch.manual_seed(0)
    enc = build_encoder(TINY_RESNET).train()
    images = _image_split(10, 0).images
    whole = extract_features(enc, images, batch_size=16)
    assert whole.shape == (10, 16) and whole.dtype == torch.float32
    assert torch.allclose(extract_features(enc, images, batch_size=3), whole, atol=1e-5)  # eval mode: batch-independent
    assert enc.training
    pixels = extract_features(lambda x: x.flatten(1), images, batch_size=4)
    assert pixels.shape == (10, 3 * 16 * 16)
    # a fixed per-channel affine map of the pixels (whatever normalisation pretraining uses)
    raw = torch.as_tensor(images).float().flatten(1)
    fit = np.polyfit(raw[:, :256].flatten().numpy(), pixels[:, :256].flatten().numpy(), 1)
    assert np.allclose(np.polyval(fit, raw[:, :256].flatten().numpy()), pixels[:, :256].flatten().numpy(), atol=1e-4)


def test_vit_patch_features_have_the_patch_grid():
    torch.manual_seed(0)
    enc = build_encoder(TINY_VIT)
    grids = vit_patch_features(enc, _image_split(3, 0, size=32).images)
    assert len(grids) == 3 and grids[0].shape == (4, 4, 24)
    with pytest.raises(TypeError, match="no patch tokens"):
        vit_patch_features(build_encoder(TINY_RESNET), _image_split(1, 0).images)


def test_vit_features_are_the_embedding_then_the_mean_patch_token():
    torch.manual_seed(0)
    enc = build_encoder(TINY_VIT)
    images = _image_split(5, 0, size=32).images
    embedding = extract_features(enc, images, features="embedding")
    both = extract_features(enc, images, features="embedding+patch_mean")
    patches = torch.stack([grid.flatten(0, 1).mean(dim=0) for grid in vit_patch_features(enc, images)])
    assert embedding.shape == (5, 24) and both.shape == (5, 48)
    assert torch.allclose(both[:, :24], embedding, atol=1e-5)
    assert torch.allclose(both[:, 24:], patches, atol=1e-5)
    resnet = build_encoder(TINY_RESNET)  # no patch tokens: the embedding either way
    assert probe_embedder(resnet, "embedding+patch_mean") == resnet.embed
    with pytest.raises(ValueError, match="features must be one of embedding, embedding"):
        probe_embedder(enc, "patches")


REPORT_KEYS = {"schema_version", "features_from", "backbone", "embed_dim", "features", "feature_dim", "image_size",
               "skipped", "num_train", "num_test", "num_classes", "num_held_out", "protocols", "seed", "models", "lift",
               "geometry", "plots"}
GEOMETRY_KEYS = {"effective_rank", "effective_rank_fraction", "sigreg", "top_eigenvalues", "per_dim_variance"}


def test_report_schema_lift_and_plots(tmp_path):
    train, test = _image_split(60, 1), _image_split(30, 2)
    torch.manual_seed(42)
    state = build_encoder(TINY_VIT).state_dict()
    report = evaluation_report(TINY_VIT, state, train, test, protocols=("linear", "knn", "fewshot"),
                               plots_dir=tmp_path)
    assert set(report) == REPORT_KEYS
    assert (report["schema_version"], report["features_from"]) == (5, "images")
    assert report["embed_dim"] == 24 and report["image_size"] == [16, 16]
    assert report["skipped"] is None and report["num_held_out"] == 30
    assert report["features"] == "embedding+patch_mean" and report["feature_dim"] == 48
    assert (report["num_train"], report["num_test"], report["num_classes"]) == (60, 30, 3)
    metric_keys = {"linear", "linear_lr", "knn_k20", "knn_k200", "fewshot_1shot_mean", "fewshot_1shot_std",
                   "fewshot_10shot_mean", "fewshot_10shot_std"}
    assert set(report["models"]) == {"pretrained", "random_init", "raw_pixels"}
    for metrics in report["models"].values():
        assert set(metrics) == metric_keys
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
        assert metrics["linear_lr"] in linear_module.LEARNING_RATES
    assert report["models"]["raw_pixels"]["linear"] > 0.9  # the channel signal is linear in the pixels
    lift = report["lift"]["vs_raw_pixels"]
    assert set(lift) == metric_keys - {"fewshot_1shot_std", "fewshot_10shot_std", "linear_lr"}
    for key, value in lift.items():
        assert value == report["models"]["pretrained"][key] - report["models"]["raw_pixels"][key]
    assert set(report["geometry"]) == {"pretrained", "random_init"}
    assert set(report["geometry"]["random_init"]) == GEOMETRY_KEYS
    geo = report["geometry"]["pretrained"]
    assert set(geo) == GEOMETRY_KEYS and 1.0 <= geo["effective_rank"] <= 24
    assert geo["effective_rank_fraction"] == pytest.approx(geo["effective_rank"] / 24)
    assert len(geo["top_eigenvalues"]) == 10 and geo["top_eigenvalues"] == sorted(geo["top_eigenvalues"], reverse=True)
    for name in ("spectrum", "patch_pca"):
        data = open(report["plots"][name], "rb").read()
        assert data[:4] == b"\x89PNG" and len(data) > 1024


def test_report_without_weights_keeps_the_schema_and_compares_baselines():
    train, test = _image_split(30, 1), _image_split(15, 2)
    report = evaluation_report(TINY_RESNET, None, train, test, protocols=("knn",), seed=3)
    assert set(report) == REPORT_KEYS
    assert report["models"]["pretrained"] is None
    assert report["lift"] == {"vs_random_init": None, "vs_raw_pixels": None}
    assert report["geometry"]["pretrained"] is None and set(report["geometry"]["random_init"]) == GEOMETRY_KEYS
    assert report["plots"] == {"spectrum": None, "patch_pca": None}
    assert (report["features"], report["feature_dim"]) == ("embedding+patch_mean", 16)  # a CNN: the embedding
    assert set(report["models"]["random_init"]) == {"knn_k20", "knn_k200"}
    again = evaluation_report(TINY_RESNET, None, train, test, protocols=("knn",), seed=3)
    assert again["models"] == report["models"] and again["geometry"] == report["geometry"]


def test_report_random_init_baseline_turns_off_zero_init_last(monkeypatch):
    """timm's default zero_init_last starts every residual branch at zero: an unfair baseline."""
    calls = []

    def spy(cfg, **kwargs):
        calls.append(kwargs)
        return build_encoder(cfg, **kwargs)

    monkeypatch.setattr(report_module, "build_encoder", spy)
    train, test = _image_split(30, 1), _image_split(15, 2)
    state = build_encoder(TINY_RESNET).state_dict()
    evaluation_report(TINY_RESNET, state, train, test, protocols=("knn",))
    assert calls == [{}, {"optional_kwargs": {"zero_init_last": False}}]


def test_report_drops_unlabelled_rows_and_rejects_bad_input():
    train, test = _image_split(30, 1), _image_split(15, 2)
    partly = Split(train.images, np.where(np.arange(30) < 6, -1, train.labels))
    assert evaluation_report(TINY_RESNET, None, partly, test, protocols=("knn",))["num_train"] == 24
    with pytest.raises(UserError, match="the train data has no labels"):
        evaluation_report(TINY_RESNET, None, Split(train.images, np.full(30, -1)), test)
    with pytest.raises(UserError, match="train images are 3x16x16 but test images 3x32x32"):
        evaluation_report(TINY_RESNET, None, train, _image_split(15, 2, size=32))
    with pytest.raises(UserError, match=r"unknown evaluation protocol\(s\) \['svm'\]"):
        evaluation_report(TINY_RESNET, None, train, test, protocols=("svm",))
    wrong = build_encoder(TINY_VIT).state_dict()
    with pytest.raises(UserError, match="the checkpoint does not fit model.backbone = 'resnet18'"):
        evaluation_report(TINY_RESNET, wrong, train, test)


def test_report_accepts_a_bare_backbone_state():
    train, test = _image_split(30, 1), _image_split(15, 2)
    torch.manual_seed(5)
    enc = build_encoder(TINY_VIT)
    full = evaluation_report(TINY_VIT, enc.state_dict(), train, test, protocols=("knn",))
    bare = evaluation_report(TINY_VIT, enc.backbone.state_dict(), train, test, protocols=("knn",))
    assert full["models"]["pretrained"] == bare["models"]["pretrained"]
    assert full["geometry"] == bare["geometry"]


def test_label_free_report_on_unlabelled_images_compares_pretrained_and_random_init(tmp_path):
    """protocols=(): no labels needed; the geometry is exactly that of each backbone's held-out
    embeddings, and the same as a labelled report computes on the same test images."""
    from lejepa_platform.eval.geometry import effective_rank, sigreg_statistic
    from lejepa_platform.eval.report import missing_labels

    train, test = _image_split(30, 1, size=32), _image_split(20, 2, size=32)
    unlabelled = Split(test.images, np.full(20, -1))
    assert missing_labels(unlabelled, "test") == "the test data has no labels (all 20 images are label -1)"
    assert missing_labels(test, "test") is None
    torch.manual_seed(7)
    state = build_encoder(TINY_VIT).state_dict()
    report = evaluation_report(TINY_VIT, state, None, unlabelled, protocols=(), seed=3, plots_dir=tmp_path,
                               skipped="labelled protocols skipped: no labels")
    assert set(report) == REPORT_KEYS and report["skipped"] == "labelled protocols skipped: no labels"
    assert report["models"] == {"pretrained": None, "random_init": None, "raw_pixels": None}
    assert report["protocols"] == [] and report["num_train"] is None and report["num_held_out"] == 20
    pretrained = report_module._load(report_module._seeded_encoder(TINY_VIT, 3), state, TINY_VIT)
    random_init = report_module._seeded_encoder(TINY_VIT, 3, optional_kwargs={"zero_init_last": False})
    for name, encoder in (("pretrained", pretrained), ("random_init", random_init)):
        feats = extract_features(encoder, test.images, features="embedding")
        geo = report["geometry"][name]
        assert geo["effective_rank"] == pytest.approx(effective_rank(feats), rel=1e-6)
        assert geo["sigreg"] == pytest.approx(sigreg_statistic(feats, seed=3), rel=1e-5)
    assert report["geometry"]["pretrained"] != report["geometry"]["random_init"]
    for name in ("spectrum", "patch_pca"):
        assert open(report["plots"][name], "rb").read()[:4] == b"\x89PNG"
    labelled = evaluation_report(TINY_VIT, state, Split(train.images, train.labels), test, protocols=("knn",),
                                 seed=3)
    assert labelled["geometry"]["pretrained"]["effective_rank"] == pytest.approx(
        report["geometry"]["pretrained"]["effective_rank"], rel=1e-6)
