"""Small types shared across the package."""

from __future__ import annotations

from collections.abc import Callable

#: ``progress(done, total)``: called by long-running library functions after each unit of work; the
#: CLI turns it into a rich progress bar. Library code never draws bars itself.
Progress = Callable[[int, int], None]
