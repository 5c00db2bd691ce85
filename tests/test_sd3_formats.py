"""SD3 LoKr and LoRA files of other tools, without krona's metadata: SimpleTuner's LyCORIS (`lycoris_`), OneTrainer's
(`lora_transformer_`, kohya's `lora_te1_` / `lora_te2_`) and diffusers' (`transformer.`, `text_encoder_2.`) are read
as SD3 adapters (SD3.5 Medium's `attn2` tells the family) and merge onto the tiny SD3 to the weights their updates
give."""

import pytest
import torch
from safetensors.torch import save_file

from krona_cli.cli import main
from krona_cli.formats import load_adapter

LAYERS = {  # (component, module): (d_out, d_in) in the tiny SD3
    ("transformer", "transformer_blocks.0.attn2.to_q"): (32, 32),
    ("transformer", "transformer_blocks.1.attn.add_k_proj"): (32, 32),
    ("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj"): (16, 16),
}
KOHYA = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def _name(tool: str, component: str, module: str) -> str:
    if component == "transformer":
        prefix = {"simpletuner": "lycoris_", "onetrainer": "lora_transformer_"}.get(tool)
        return prefix + module.replace(".", "_") if prefix else f"transformer.{module}"
    return KOHYA[component] + module.replace(".", "_") if tool != "diffusers" else f"{component}.{module}"


def _file(tool: str) -> tuple[dict, dict]:
    """(tensors, the update ΔW each layer makes) of `tool`'s file."""
    g = torch.Generator().manual_seed(1)
    tensors, deltas = {}, {}
    for (component, module), (d_out, d_in) in LAYERS.items():
        name = _name(tool, component, module)
        if tool == "simpletuner":  # LoKr, both factors full: ComfyUI's and LyCORIS's scale is 1
            w1, w2 = torch.randn(4, 4, generator=g), torch.randn(d_out // 4, d_in // 4, generator=g) * 0.1
            tensors |= {f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2}
            deltas[component, module] = torch.kron(w1, w2)
        else:
            down, up = torch.randn(2, d_in, generator=g), torch.randn(d_out, 2, generator=g) * 0.1
            if tool == "onetrainer":  # kohya's LoRA keys with alpha: scale alpha / rank
                tensors |= {
                    f"{name}.lora_down.weight": down,
                    f"{name}.lora_up.weight": up,
                    f"{name}.alpha": torch.tensor(1.0),
                }
                deltas[component, module] = up @ down * 0.5
            else:
                tensors |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
                deltas[component, module] = up @ down
    return tensors, deltas


@pytest.mark.parametrize("tool", ["simpletuner", "onetrainer", "diffusers"])
def test_other_tools_sd3_files_are_read_and_merged_as_sd3(tool, tiny_sd3_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    tensors, deltas = _file(tool)
    path = tmp_path / f"{tool}.safetensors"
    save_file(tensors, str(path))
    adapter = load_adapter(path)
    assert adapter.architecture == "sd3" and set(adapter.layers) == {"transformer", "text_encoder_2"}
    merged = tmp_path / "merged"
    assert (
        main(["merge", "--adapter", str(path), "--pretrained-model", str(tiny_sd3_dir), "--output-dir", str(merged)])
        == 0
    )
    base, out = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir), StableDiffusion3Pipeline.from_pretrained(merged)
    for (component, module), delta in deltas.items():
        before = getattr(base, component).get_submodule(module).weight
        after = getattr(out, component).get_submodule(module).weight
        torch.testing.assert_close(after, before + delta, rtol=1e-5, atol=1e-6)
    untouched = "transformer_blocks.0.attn.to_q"
    assert torch.equal(
        base.transformer.get_submodule(untouched).weight, out.transformer.get_submodule(untouched).weight
    )


def test_a_merged_single_file_is_stabilitys_layout_and_reads_back_to_the_merged_weights(tiny_sd3_dir, tmp_path):
    """`krona merge --output` writes the transformer alone in the MMDiT layout: diffusers' converter reads it back to
    the transformer the folder merge gives, the last block's text modulation and the final one swapped back."""
    from diffusers import SD3Transformer2DModel
    from safetensors import safe_open
    from test_train import config

    from krona_cli.training.train import train

    run = train(config(tiny_sd3_dir, tmp_path / "run", steps=2, targets="attn-ff", lr=1e-2))
    adapter = ["merge", "--adapter", str(run.adapter)]
    assert main([*adapter, "--output", str(tmp_path / "m.safetensors"), "--dtype", "fp32"]) == 0
    assert main([*adapter, "--output-dir", str(tmp_path / "folder")]) == 0
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "joint_blocks.0.x_block.attn2.qkv.weight" in keys and "joint_blocks.1.context_block.attn.qkv.weight" in keys
    assert not any(k.startswith("transformer_blocks.") for k in keys)
    read = SD3Transformer2DModel.from_single_file(
        str(tmp_path / "m.safetensors"), config=str(tiny_sd3_dir), subfolder="transformer"
    ).state_dict()
    want = SD3Transformer2DModel.from_pretrained(tmp_path / "folder", subfolder="transformer").state_dict()
    base = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir, subfolder="transformer").state_dict()
    assert read.keys() == want.keys() and all(torch.equal(read[k], want[k]) for k in want)
    assert not torch.equal(
        want["transformer_blocks.0.attn2.to_q.weight"], base["transformer_blocks.0.attn2.to_q.weight"]
    )


def test_an_adapter_of_the_clips_is_not_merged_into_the_transformer_file(tiny_sd3_dir, tmp_path, capsys):
    from test_train import config

    from krona_cli.training.train import train

    run = train(config(tiny_sd3_dir, tmp_path / "run", steps=1, train_text_encoder=True))
    assert main(["merge", "--adapter", str(run.adapter), "--output", str(tmp_path / "m.safetensors")]) == 2
    assert "merge into a diffusers folder (--output-dir)" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()
