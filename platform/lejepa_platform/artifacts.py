"""Names of the files a run leaves behind, in one place: training writes them, `lejepa eval` and
the tests read them back, and a rename here is a rename everywhere."""

BACKBONE_FILE = "backbone.safetensors"
"""The final backbone's weights (loads into the same timm model); an MLflow artifact of the run."""
CONFIG_FILE = "config.json"
"""The resolved RunConfig: in every checkpoint directory and as an MLflow artifact of the run."""
REPORT_FILE = "evaluation.json"
"""The end-of-run (or `lejepa eval`) evaluation report."""
LOSS_CURVE_FILE = "loss_curve.png"
"""The plotted loss terms over the run."""
STREAM_STATS_FILE = "ray_data_stats.txt"
"""Ray Data's `Dataset.stats()` of each rank's training stream."""
