"""A run directory: the workdir (lock, disk errors), Orbax checkpoints, metrics.jsonl, and opening
a trained run.
"""
