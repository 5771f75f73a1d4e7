"""Sub-commands of the ``kvaware-scorer`` console script (each has add_arguments and run)."""

from __future__ import annotations
