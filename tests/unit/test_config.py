"""Config: defaults validate, overrides derive new objects, bad keys and values name the field."""

import dataclasses
import re

import pytest

from lejepa_platform.config import (ConfigError, DataConfig, EvalConfig, LossConfig, ModelConfig, RunConfig, TrainConfig,
                                    flatten, per_worker_batch_size, to_dict, warmup_steps)
from lejepa_platform.defaults import default_run_config
from lejepa_platform.overrides import apply_overrides, from_dict
from lejepa_platform.recipes import load_recipe

pytestmark = pytest.mark.unit


def test_round_trip_through_dict_is_identity():
    cfg = default_run_config()
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_overrides_return_new_config_and_leave_original():
    cfg = default_run_config()
    new = apply_overrides(cfg, ["loss.lam=0.02", "train.workers=2", "data.global_scale=0.2,0.9",
                                "train.use_gpu=true", "model.backbone_kwargs.depth=2", "eval.protocols=knn"])
    assert new.loss.lam == 0.02 and cfg.loss.lam == 0.05
    assert new.train.workers == 2 and new.train.use_gpu is True
    assert new.data.global_scale == (0.2, 0.9)
    assert new.model.backbone_kwargs["depth"] == 2 and cfg.model.backbone_kwargs["depth"] == 4
    assert new.eval.protocols == ("knn",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        new.loss.lam = 0.1  # type: ignore[misc]


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert apply_overrides(RunConfig(), ["loss.t_max=4"]).loss.t_max == 4.0
    with pytest.raises(ConfigError, match="loss.num_slices must be an integer"):
        apply_overrides(RunConfig(), ["loss.num_slices=2.5"])


@pytest.mark.parametrize("override, message", [
    ("loss.lamda=0.1", "unknown config key 'loss.lamda'.*lam"),
    ("training.steps=3", "unknown config key 'training.steps'"),
    ("loss.lam=1.5", r"loss.lam = 1.5 is not allowed: must be in the open interval \(0, 1\)"),
    ("loss.knots=16", "loss.knots = 16 is not allowed: must be an odd integer"),
    ("loss.t_max=0", "loss.t_max = 0.0 is not allowed"),
    ("train.use_gpu=maybe", "train.use_gpu must be true or false"),
    ("train.precision=fp16", "one of auto, bf16, fp32"),
    ("data.batch_size=129", "divisible by train.workers"),
    ("loss", "must look like section.field=value"),
    ("loss=3", "is a section"),
])
def test_bad_overrides_name_the_field_and_the_allowed_values(override, message):
    cfg = apply_overrides(RunConfig(), ["train.workers=2"]) if "batch_size" in override else RunConfig()
    with pytest.raises(ConfigError, match=message):
        apply_overrides(cfg, [override])


def test_from_dict_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigError, match="unknown config key 'loss.bogus'"):
        from_dict(RunConfig, {"loss": {"bogus": 1}})
    with pytest.raises(ConfigError, match="data.global_scale must have 2 items"):
        from_dict(RunConfig, {"data": {"global_scale": [0.1, 0.2, 0.3]}})


def test_flatten_has_one_entry_per_leaf():
    flat = flatten(RunConfig())
    assert flat["loss.lam"] == 0.05 and flat["data.global_scale"] == [0.3, 1.0]
    n_leaves = sum(len(dataclasses.fields(getattr(RunConfig(), f.name))) for f in dataclasses.fields(RunConfig))
    assert len(flat) == n_leaves


def test_derived_values():
    cfg = apply_overrides(RunConfig(), ["train.workers=4", "data.batch_size=256", "train.steps=1000",
                                        "train.warmup_frac=0.05"])
    assert per_worker_batch_size(cfg) == 64
    assert warmup_steps(cfg) == 50


def test_section_validation_runs_on_direct_construction():
    with pytest.raises(ConfigError, match="data.local_scale"):
        DataConfig(local_scale=(0.5, 0.1))
    with pytest.raises(ConfigError, match="loss.num_slices"):
        LossConfig(num_slices=0)


@pytest.mark.parametrize("recipe", ["pipelines/default.py", "pipelines/imagenette_vits8.py", "pipelines/in1k_vitl.py"])
def test_recipes_build_and_validate(recipe):
    cfg = load_recipe(recipe, RunConfig)
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_default_recipe_is_the_embedded_default():
    assert load_recipe("pipelines/default.py", RunConfig) == default_run_config()


def test_recipe_errors_are_user_errors(tmp_path):
    from lejepa_platform.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.py"), RunConfig)
    bad = tmp_path / "bad.py"
    bad.write_text("def other():\n    return 1\n")
    with pytest.raises(UserError, match="has no function 'config'; functions found: other"):
        load_recipe(str(bad), RunConfig)
    with pytest.raises(UserError, match="returned int, expected RunConfig"):
        load_recipe(f"{bad}:other", RunConfig)


@pytest.mark.parametrize("section, field, bad, allowed", [
    (ModelConfig, "proj_norm", "bn", "one of batchnorm, layernorm, none"),
    (DataConfig, "split", "val", "one of train, test, all"),
    (DataConfig, "augment_on", "gpu", "one of auto, data, device"),
    (TrainConfig, "precision", "fp16", "one of auto, bf16, fp32"),
    (EvalConfig, "features", "cls", "one of embedding, embedding+patch_mean"),
    (EvalConfig, "protocols", ("knn", "svm"), "a non-empty list drawn from linear, knn, fewshot"),
])
def test_string_choices_are_checked_from_their_literal_type_however_the_config_is_built(section, field, bad, allowed):
    with pytest.raises(ConfigError, match=f"{section.SECTION}.{field} = .* is not allowed: must be {re.escape(allowed)}"):
        section(**{field: bad})  # a recipe builds sections directly, without --set
