"""The run's plan: each source planned once, the probe's classes from the plan, sides resolved."""

import pytest

from lejepa_platform.data import reader
from lejepa_platform.defaults import default_run_config
from lejepa_platform.overrides import apply_overrides
from lejepa_platform.run.plan import prepare

pytestmark = pytest.mark.unit


@pytest.fixture()
def opened(monkeypatch):
    """The sources opened by planning (each opening reads a listing, footers or a manifest)."""
    sources = []
    original = reader.open_source

    def counting(source):
        sources.append(source)
        return original(source)

    monkeypatch.setattr(reader, "open_source", counting)
    return sources


def test_one_plan_of_the_training_source_serves_training_and_evaluation(opened, tmp_path):
    cfg = apply_overrides(default_run_config(), [f"train.storage_path={tmp_path}"])
    plan = prepare(cfg)
    assert opened == ["builtin:fashion-mnist-10k"]
    assert (plan.data.split, plan.data.rows, plan.num_classes) == ("train", 8000, 10)
    sides = plan.evaluation
    assert sides.split == "own" and (sides.train.rows, sides.test.rows) == (8000, 2000)
    assert sides.train.units == plan.data.units  # the same plan, not a second reading


def test_a_separate_eval_source_is_the_one_more_plan(opened, tmp_path, class_folder):
    cfg = apply_overrides(default_run_config(), [f"train.storage_path={tmp_path}", f"eval.data={class_folder}"])
    plan = prepare(cfg)
    assert opened == [str(class_folder), "builtin:fashion-mnist-10k"]
    assert plan.evaluation.source == str(class_folder) and plan.evaluation.split == "seeded"
    assert plan.evaluation.whole.rows == 12


def test_a_labelled_folder_used_directly_gets_its_classes(opened, tmp_path, class_folder):
    cfg = apply_overrides(default_run_config(), [f"train.storage_path={tmp_path}", f"data.source={class_folder}",
                                                 "data.batch_size=4", "eval.enabled=false"])
    plan = prepare(cfg)
    assert opened == [str(class_folder)] and plan.evaluation is None
    assert plan.num_classes == 3 and plan.data.class_names == ("boots", "coats", "shirts")
