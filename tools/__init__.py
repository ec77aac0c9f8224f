"""Offline tools over runs and checkpoints, apart from the training runtime: `python -m tools.export`
(a checkpoint as an HF directory), `python -m tools.report` (plots of runs), `python -m tools.eval` (held-out
accuracy of a checkpoint or HF directory)."""
