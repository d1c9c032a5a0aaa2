"""Scaling runs: a grid of ordinary training runs (sweep), their evaluation, scaling-law fits and
a report. CLI: `python -m pretrain.scaling {sweep,evaluate,fit,report} ...`."""
