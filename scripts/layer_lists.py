"""Write configs/models/layers/ARCH.json: every nn.Linear (name, d_out, d_in) of each adaptable component of the real
architectures (the denoiser and the text encoders `--train-text-encoder` adapts: not FLUX's T5), from the diffusers and
transformers models built on the meta device from the shipped configs, for every family with `layer_list` set. `krona
plan` reads these lists instead of importing the model libraries; tests/test_plan.py holds them equal to the models.
Run again when a config in configs/models/ or the libraries' classes change.

    python scripts/layer_lists.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from krona_cli import families
from krona_cli.architectures import LAYERS_DIR
from krona_cli.pipeline.models import build_meta_components, linear_layers_of


def main() -> None:
    LAYERS_DIR.mkdir(exist_ok=True)
    for arch in (f.name for f in families.FAMILIES if f.layer_list):
        components = {name: linear_layers_of(model) for name, model in build_meta_components(arch).items()}
        path = LAYERS_DIR / f"{arch}.json"
        body = ",\n".join(
            f'    "{name}": [\n' + ",\n".join(f"      {json.dumps(list(layer))}" for layer in layers) + "\n    ]"
            for name, layers in components.items()
        )
        path.write_text('{\n  "components": {\n' + body + "\n  }\n}\n")
        print(f"{path.relative_to(ROOT)}: " + ", ".join(f"{n} {len(v)} linears" for n, v in components.items()))


if __name__ == "__main__":
    main()
