"""Ray Tune sweeps and scaling-law analysis."""
