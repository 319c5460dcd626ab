"""DINO training: config, loss, schedules, EMA, optimizer pieces, data, checkpoints and the loop.

The public function is :func:`dinokit.train` (defined in :mod:`dinokit.train.loop`); the package
``dinokit/__init__.py`` keeps that function from being shadowed by this package.
"""
