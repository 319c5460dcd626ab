"""DINO training: config, loss, schedules, EMA, optimizer pieces, data, checkpoints and the loop.

``dinokit.train`` is both this package and the public function :func:`dinokit.train.loop.train`:
once any ``dinokit.train.*`` submodule is imported, Python binds the package to ``dinokit.train``,
so the package itself is made callable and forwards to the function.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from dinokit.train.loop import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
