"""Evaluations: creation and checks, and the run that scores every model on a worker."""
