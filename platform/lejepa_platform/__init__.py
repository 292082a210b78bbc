"""LeJEPA pretraining platform: views built by Ray tasks, Ray Train workers, exact SIGReg, MLflow tracking.

The import name is `lejepa_platform` (not `platform`, which would shadow the standard library,
and not `lejepa`, the reference implementation's name).
"""

__version__ = "0.1.0"
