"""Where the public model configs krona ships live (configs/models/, and the real models' layer lists under
layers/), and reading one. The families themselves are krona_cli/families/. No torch: file formats and model loading
both read it."""

from __future__ import annotations

import json
from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
MODEL_CONFIGS_DIR = CONFIGS_DIR / "models"
LAYERS_DIR = MODEL_CONFIGS_DIR / "layers"


def load_model_config(name: str) -> dict:
    """A config file from configs/models/, without its `_comment`."""
    path = MODEL_CONFIGS_DIR / name
    config = json.loads(path.read_text())
    config.pop("_comment", None)
    return config
