"""Reading the JSON files a model directory holds (config.json, generation_config.json) with one-line errors."""
from __future__ import annotations

import json
from pathlib import Path


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; a ValueError naming the file when it is not valid JSON or not an object."""
    try:
        raw = json.loads(Path(path).read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return raw
