"""Tuning jobs: creation and checks, the run that trains and publishes a version, checkpoints."""
