"""The 'frontierlm' logger: INFO to stderr by default (like vLLM), quiet with FRONTIERLM_LOG_LEVEL=WARNING."""
from __future__ import annotations

import logging
import os
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (tests and servers replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def init_logger(name: str = "frontierlm") -> logging.Logger:
    root = logging.getLogger("frontierlm")
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("FRONTIERLM_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return logging.getLogger(name)
