"""What a fixed-size cluster must keep free of trainers: CPUs for the data tasks.

The data tasks that read, decode and build views each hold one CPU, and trainers that take every CPU leave
them none, so the run would wait forever for its first batch. Both a single run (`lejepa
pretrain`) and a sweep (how many trials side by side) apply this one rule.
"""

from __future__ import annotations

from lejepa_platform.errors import UserError

DATA_CPUS = 1.0
"""CPUs left for the data tasks on a cluster that cannot grow."""


def check_room_for_data(trainer_cpus: float, cluster_cpus: float, what: str) -> None:
    """UserError unless `trainer_cpus` (described by `what`) plus DATA_CPUS fit in `cluster_cpus`."""
    if trainer_cpus + DATA_CPUS > cluster_cpus:
        raise UserError(f"{what} = {trainer_cpus:g} CPUs, but this cluster has {cluster_cpus:g} and the data tasks need "
                        f"{DATA_CPUS:g} of them left to read and augment images; lower train.workers or "
                        "train.cpus_per_worker")


def trainers_that_fit(trainer_cpus: float, cluster_cpus: float) -> int:
    """How many trainers of `trainer_cpus` each fit side by side with DATA_CPUS left over."""
    return int((cluster_cpus - DATA_CPUS) // trainer_cpus)
