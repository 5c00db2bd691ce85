"""What every family of the transformer round (SD3.5, FLUX.2 [klein], Qwen-Image, Z-Image) must do beside its own
tests: train on an int8 base (its transformer's linears quantized) and validate at every step, with prior
preservation, on its tiny pipeline."""

import pytest
from test_train import CLASS_PROMPT, config
from torch import nn

from krona_cli import families
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


@pytest.mark.parametrize("family", ["sd3", "flux2", "qwen-image", "z-image"])
def test_its_merged_single_file_given_as_the_base_is_one_line(family, request, tmp_path, capsys):
    """The transformer-only file `krona merge --output` writes is not a base krona reads: one line naming the family
    and what to give, exit 2, nothing written (FLUX.2's is not mistaken for a FLUX.1 transformer file)."""
    from krona_cli.cli import main

    folder = request.getfixturevalue(f"tiny_{family.replace('-', '_')}_dir")
    run = train(config(folder, tmp_path / "run", steps=1))
    assert main(["merge", "--adapter", str(run.adapter), "--output", str(tmp_path / "m.safetensors")]) == 0
    capsys.readouterr()
    args = ["sample", "--pretrained-model", str(tmp_path / "m.safetensors"), "--prompt", "x", "-n", "1"]
    assert main([*args, "--output-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "single file" in err and "diffusers folder or hub id" in err
    title = families.get(family).title
    assert f"'{tmp_path / 'm.safetensors'}' is a {title} single file" in err and not (tmp_path / "s").exists()
