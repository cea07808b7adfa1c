"""The 'frontierlm' logger: INFO to stderr by default (like vLLM), quiet with FRONTIERLM_LOG_LEVEL=WARNING."""
from __future__ import annotations

import logging
import os


def init_logger(name: str = "frontierlm") -> logging.Logger:
    root = logging.getLogger("frontierlm")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("FRONTIERLM_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return logging.getLogger(name)
