"""``python -m examples.vllm_router --config examples/vllm_router/config.yaml``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
