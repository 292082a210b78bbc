"""Run orchestration on the driver: launch a pretraining, stop it gracefully, finalize and evaluate
it, keep its record. Above train/ (what runs on the workers) and eval/ (the protocols)."""
