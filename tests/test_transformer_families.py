"""What every family of the transformer round (SD3.5, FLUX.2 [klein], Qwen-Image, Z-Image) must do beside its own
tests, on its tiny pipeline: train on an int8 base (its transformer's linears quantized) and validate at every step,
with prior preservation; resume bit-identically; merge into the single file of its makers' layout that diffusers reads
back; refuse the settings it has no use for."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import CLASS_PROMPT, config
from torch import nn

from krona_cli import families
from krona_cli.cli import main
from krona_cli.errors import KronaError
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


# What each family's resumed run must have adapted (its feed-forward and its own kinds of blocks), and what not
RESUMED = {
    "flux2": (
        {"single_transformer_blocks.1.attn.to_qkv_mlp_proj", "transformer_blocks.0.ff_context.linear_out"},
        set(),
    ),
    "z-image": (
        {"layers.1.feed_forward.w2", "noise_refiner.0.attention.to_q", "context_refiner.0.attention.to_out.0"},
        set(),
    ),
    # the last block's text stream after its attention cannot learn (the output is the image stream's): left out
    "qwen-image": (
        {"transformer_blocks.0.txt_mlp.net.2", "transformer_blocks.1.attn.add_k_proj"},
        {"transformer_blocks.1.txt_mlp.net.2"},
    ),
}


@pytest.mark.parametrize("family", sorted(RESUMED))
def test_a_resumed_run_is_bit_identical_to_a_straight_one(family, request, tmp_path):
    """With prior preservation (class images drawn by the tiny model), EMA and the feed-forward layers (SD3's, which
    trains its CLIPs too, is in test_sd3_train.py)."""
    folder = request.getfixturevalue(f"tiny_{family.replace('-', '_')}_dir")
    common = dict(targets="attn-ff", checkpoint_every=2, lr=1e-2, ema=True, class_prompt=CLASS_PROMPT)
    common |= dict(class_dir=str(tmp_path / "classes"), num_class_images=2)
    straight = train(config(folder, tmp_path / "straight", steps=4, **common))
    train(config(folder, tmp_path / "resumed", steps=2, **common))
    resumed = train(config(folder, tmp_path / "resumed", steps=4, resume="latest", **common))
    a, b = load_file(straight.adapter), load_file(resumed.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    modules = {k.removeprefix("transformer.").rsplit(".", 1)[0] for k in a}
    adapted, left_out = RESUMED[family]
    assert adapted <= modules and not left_out & modules
    assert all(a[k].abs().sum() > 0 for k in a if k.endswith("kron_b"))
    assert len(list((tmp_path / "classes").glob("*.png"))) == 2


# Each family's merged transformer file: keys it must hold and key parts none may have (None: diffusers' own names,
# the file's keys are the transformer's). SD3's is in test_sd3_formats.py, with its CLIPs.
SINGLE_FILES = {
    "flux2": (
        {
            "double_blocks.0.img_attn.qkv.weight",
            "single_blocks.1.linear1.weight",
            "img_in.weight",
            "double_blocks.0.img_attn.norm.query_norm.scale",
        },
        (".to_q.",),
    ),
    "z-image": (
        {"layers.0.attention.qkv.weight", "x_embedder.weight", "final_layer.linear.weight"},
        (".to_q.", "all_"),
    ),
    "qwen-image": None,  # ComfyUI's Qwen-Image model has diffusers' names
}


@pytest.mark.parametrize("family", sorted(SINGLE_FILES))
def test_the_merged_single_file_is_its_makers_layout_and_diffusers_reads_it_back(family, request, tmp_path):
    """`krona merge --output` writes the transformer alone in the layout its single files have; diffusers'
    from_single_file reads it back to the weights of the merged folder, exactly."""
    import diffusers
    from safetensors import safe_open

    folder = request.getfixturevalue(f"tiny_{family.replace('-', '_')}_dir")
    run = train(config(folder, tmp_path / "run", steps=2, targets="attn-ff", lr=1e-2))
    merge = ["merge", "--adapter", str(run.adapter)]
    assert main([*merge, "--output", str(tmp_path / "m.safetensors"), "--dtype", "fp32"]) == 0
    assert main([*merge, "--output-dir", str(tmp_path / "folder")]) == 0
    model = getattr(diffusers, json.loads((folder / "transformer" / "config.json").read_text())["_class_name"])
    want = model.from_pretrained(tmp_path / "folder", subfolder="transformer").state_dict()
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        keys = set(f.keys())
    if SINGLE_FILES[family] is None:
        assert keys == set(want)
    else:
        has, has_not = SINGLE_FILES[family]
        assert has <= keys and not any(part in k for k in keys for part in has_not)
    read = model.from_single_file(str(tmp_path / "m.safetensors"), config=str(folder), subfolder="transformer")
    read = read.state_dict()
    assert read.keys() == want.keys() and all(torch.equal(read[k], want[k]) for k in want)


@pytest.mark.parametrize("flag", [{"guidance": 2.0}, {"max_sequence_length": 64}, {"train_text_encoder": True}])
@pytest.mark.parametrize("family", ["flux2", "qwen-image", "z-image"])
def test_settings_a_family_has_no_use_for_are_refused(family, flag, request, tmp_path):
    folder = request.getfixturevalue(f"tiny_{family.replace('-', '_')}_dir")
    with pytest.raises(KronaError):
        train(config(folder, tmp_path / "r", steps=1, **flag))
    assert not (tmp_path / "r" / "adapter.safetensors").exists()
