"""What every family of the transformer round (SD3.5, FLUX.2 [klein], Qwen-Image, Z-Image) must do beside its own
tests: train on an int8 base (its transformer's linears quantized) and validate at every step, with prior
preservation, on its tiny pipeline."""

import pytest
from test_train import CLASS_PROMPT, config
from torch import nn

from krona_cli.kron.layer import is_quantized
from krona_cli.training.train import train


@pytest.mark.parametrize("family", ["sd3", "flux2", "qwen-image", "z-image"])
def test_trains_and_validates_on_an_int8_base_with_prior_preservation(family, request, tmp_path, captured_pipes):
    folder = request.getfixturevalue(f"tiny_{family.replace('-', '_')}_dir")
    classes = dict(class_prompt=CLASS_PROMPT, class_dir=str(tmp_path / "classes"), num_class_images=1)
    run = train(config(folder, tmp_path / "run", steps=2, base_precision="int8", validate_every=1, **classes))
    transformer = captured_pipes[0].transformer
    assert any(isinstance(m, nn.Linear) and is_quantized(m) for m in transformer.modules())
    assert [v["step"] for v in run.validation] == [0, 1, 2]
    assert all(v["instance_loss"] > 0 and v["class_loss"] > 0 for v in run.validation)
