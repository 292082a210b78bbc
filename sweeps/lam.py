"""The one LeJEPA hyperparameter: lam on a log scale around the paper's 0.05, ASHA stopping poor
trials early. The default recipe's model on builtin:fashion-mnist-10k.

The scheduler compares the online probe accuracy, not the LeJEPA loss: lam changes the loss's
own scale, so losses of different lam values are not comparable (they are across model sizes).

    lejepa sweep sweeps/lam.py
"""

from lejepa_platform.config import SweepConfig
from lejepa_platform.defaults import default_run_config
from lejepa_platform.overrides import set_values


def config() -> SweepConfig:
    base = set_values(default_run_config(), {"train.steps": 300, "train.time_budget_s": 0.0,  # equal steps per trial
                                             "train.cpus_per_worker": 0.5, "track.experiment": "lam"})
    return SweepConfig(
        base=base,
        space={"loss.lam": {"loguniform": [0.005, 0.5]}},
        num_samples=8, scheduler="asha", metric="probe/online_acc", mode="max", grace_reports=5, name="lam",
    )
