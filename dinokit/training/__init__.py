"""DINO training: config, loss, schedules, EMA, optimizer pieces, data, checkpoints and the loop.

The public function is :func:`dinokit.train` (defined in :mod:`dinokit.training.loop`).
"""
