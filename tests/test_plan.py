"""`krona plan`: parameter counts on the real architectures (meta device), checked against the paper and by hand."""

import json
import re
import subprocess
import sys

import pytest

from krona_cli import families
from krona_cli.cli import main
from krona_cli.inference.plan import plan


def kron_params(a_out, a_in, d_out, d_in):
    return a_out * a_in + (d_out // a_out) * (d_in // a_in)


def sdxl_attn_by_hand(per_linear):
    """SDXL: 10 transformer blocks at width 640 and 60 at 1280; attn1 is 4 c×c linears, attn2 has k/v 2048→c."""

    def block(c):
        return 6 * per_linear(c, c) + 2 * per_linear(c, 2048)

    return 10 * block(640) + 60 * block(1280)


def test_sdxl_64x4_matches_the_paper_and_lora_rank_4():
    total = plan("sdxl", ["64x4"])["total"]
    assert total.layers == 560
    assert total.kron["64x4"] == 3_874_560
    assert total.lora[4] == 5_806_080


def test_other_factor_settings_by_hand_count():
    groups = plan("sdxl", ["8x64", "16x16", "48x4"])
    total = groups["total"]
    assert total.kron["8x64"] == sdxl_attn_by_hand(lambda o, i: kron_params(8, 64, o, i)) == 2_152_320
    assert total.kron["16x16"] == sdxl_attn_by_hand(lambda o, i: kron_params(16, 16, o, i))
    # 48 divides none of 640 and 1280: every layer falls back to the largest divisor not above 48, i.e. 40
    assert total.kron["48x4"] == sdxl_attn_by_hand(lambda o, i: kron_params(40, 4, o, i))
    assert total.lora[8] == sdxl_attn_by_hand(lambda o, i: 8 * (o + i))
    assert sum(g.layers for name, g in groups.items() if name != "total") == 560


def test_sd15_and_text_encoders_by_hand():
    # SD 1.5: 16 transformer blocks: 5 at 320, 5 at 640, 6 at 1280 (mid included); k/v read 768-wide text
    def sd15(per_linear):
        def block(c):
            return 6 * per_linear(c, c) + 2 * per_linear(c, 768)

        return 5 * block(320) + 5 * block(640) + 6 * block(1280)

    assert plan("sd15", ["64x4"])["total"].kron["64x4"] == sd15(lambda o, i: kron_params(64, 4, o, i)) == 398_048
    assert plan("sd15", ["64x4"])["total"].lora[4] == 797_184
    text = plan("sdxl", ["64x4"], targets="text")
    assert text["text_encoder"].kron["64x4"] == 48 * kron_params(64, 4, 768, 768) == 122_880
    assert text["text_encoder_2"].kron["64x4"] == 128 * kron_params(64, 4, 1280, 1280)


def test_cli_plan_prints_the_paper_figures(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["plan", "--arch", "sdxl", "--factors", "64x4"]) == 0
    out = capsys.readouterr().out
    assert "3,874,560" in out and "5,806,080" in out and "14.78M" in out


def test_cli_plan_json_and_several_settings(capsys):
    assert main(["plan", "--arch", "sdxl", "--factors", "64x4,8x64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["groups"]["total"]["kron"] == {"64x4": 3_874_560, "8x64": 2_152_320}
    assert data["groups"]["total"]["lora"]["r4"] == 5_806_080


def test_cli_plan_bad_input(capsys):
    assert main(["plan", "--arch", "sd4"]) == 2
    err = capsys.readouterr().err
    assert "unknown architecture 'sd4'" in err and "Traceback" not in err
    assert main(["plan", "--factors", "64by4"]) == 2
    assert main(["plan", "--factors", "48x4", "--strict-factors"]) == 2
    assert "do not divide" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["sdxl", "sd15", "flux", "sd3", "flux2", "qwen-image", "z-image"])
def test_the_layer_lists_are_the_meta_models(arch):
    """`krona plan` reads the layer lists as data (no model library): they must be exactly the linears of the
    diffusers and transformers models built from the shipped configs (scripts/layer_lists.py writes them)."""
    from krona_cli.pipeline.models import build_meta_components, linear_layers_of

    models = {name: linear_layers_of(model) for name, model in build_meta_components(arch).items()}
    assert families.get(arch).linear_layers() == models


@pytest.mark.parametrize("arch", ["sdxl", "flux", "sd3", "flux2", "qwen-image", "z-image"])
def test_plan_imports_no_model_library(arch):
    code = f"import sys; from krona_cli.cli import main; main(['plan', '--arch', '{arch}']); "
    code += "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'bitsandbytes') if sys.modules.get(m)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.fixture(scope="module")
def flux_transformer_linears():
    """(name, d_out, d_in) of every nn.Linear of FLUX.1's transformer, read off the meta model here (not the list)."""
    from torch import nn

    from krona_cli.pipeline.models import build_component

    model = build_component("flux", "transformer")
    return [(n, m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def largest_divisor(n, at_most):
    return max(d for d in range(1, at_most + 1) if n % d == 0)


@pytest.mark.parametrize("targets", ["attn", "attn-ff"])
def test_flux_plan_is_the_meta_transformer_counted_by_hand(targets, flux_transformer_linears):
    """`plan --arch flux` against the meta transformer: the FLUX presets' linears, grouped by double and single
    block, and Kronecker factors fitted here (40 divides no FLUX width: it falls back to 32)."""
    pattern = re.compile(families.get("flux").target_presets[targets])
    chosen = [(n, o, i) for n, o, i in flux_transformer_linears if pattern.search(n)]
    settings = {"64x4": (64, 4), "40x6": (40, 6)}
    groups = plan("flux", list(settings), targets=targets)
    expected = {}
    for name, d_out, d_in in chosen:
        block = ".".join(name.split(".")[:2])
        assert block.split(".")[0] in ("transformer_blocks", "single_transformer_blocks")
        for key in (block, "all"):
            e = expected.setdefault(key, {"layers": 0, "lora4": 0, **dict.fromkeys(settings, 0)})
            e["layers"] += 1
            e["lora4"] += 4 * (d_out + d_in)
            for label, (a_out, a_in) in settings.items():
                e[label] += kron_params(largest_divisor(d_out, a_out), largest_divisor(d_in, a_in), d_out, d_in)
    expected["total"] = expected.pop("all")
    assert list(groups) == list(expected)  # module order: the 19 double blocks, the 38 single ones, the total
    assert len(groups) == 19 + 38 + 1
    for key, e in expected.items():
        g = groups[key]
        assert (g.layers, g.kron["64x4"], g.kron["40x6"], g.lora[4]) == (e["layers"], e["64x4"], e["40x6"], e["lora4"])
    assert groups["total"].used == {"64x4": {"64x4"}, "40x6": {"32x6"}}


def test_flux_totals_by_hand():
    """FLUX.1: 19 double blocks (image and text q/k/v/out: 8 linears 3072x3072) and 38 single ones (q/k/v); attn-ff
    adds each double block's two 4x MLPs (3072 -> 12288 -> 3072) and each single block's proj_mlp (3072 -> 12288) and
    proj_out (15360 -> 3072: attention and MLP outputs together)."""
    square, mlp, out = kron_params(64, 4, 3072, 3072), kron_params(64, 4, 12288, 3072), kron_params(64, 4, 3072, 15360)
    attn, attn_ff = plan("flux", ["64x4"])["total"], plan("flux", ["64x4"], targets="attn-ff")["total"]
    assert (attn.layers, attn.kron["64x4"]) == (19 * 8 + 38 * 3, 266 * square) == (266, 9_873_920)
    assert attn.lora[4] == 266 * 4 * 6144 == 6_537_216
    assert kron_params(64, 4, 3072, 12288) == mlp
    assert attn_ff.layers == 266 + 19 * 4 + 38 * 2 == 418
    assert attn_ff.kron["64x4"] == 266 * square + (19 * 4 + 38) * mlp + 38 * out == 33_726_976
    assert attn_ff.lora[4] == 16_343_040


def test_flux_text_and_top_level_groups():
    """`text` adapts CLIP only (T5 is never adapted); a module outside every block counts as the transformer."""
    text = plan("flux", ["64x4"], targets="text")
    assert list(text) == ["text_encoder", "total"]
    assert text["text_encoder"].kron["64x4"] == 48 * kron_params(64, 4, 768, 768)
    groups = plan("flux", ["64x4"], targets=r"proj_out$")
    assert list(groups)[-2:] == ["transformer", "total"] and groups["transformer"].layers == 1
    assert groups["total"].layers == 38 + 1


def test_cli_plan_flux(capsys):
    assert main(["plan", "--arch", "flux", "--targets", "attn-ff", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["groups"]["total"]["kron"] == {"64x4": 33_726_976}
    assert data["groups"]["single_transformer_blocks.37"]["layers"] == 5


def test_readme_table_of_families_is_what_plan_counts():
    """README's table of families: each row's layers, krona 64x4 and LoRA r4 parameters are `krona plan`'s, and every
    family with a layer list has a row."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("<!-- families table: tests/test_plan.py holds it to `krona plan` -->", 1)[1]
    lines = table.strip().split("\n\n")[0].splitlines()  # the table: up to the first blank line
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and "`" in line and "--arch" not in line]
    found = {}
    for row in rows:
        arch = row[1].strip().strip("`")
        found[arch] = tuple(int(cell.strip().replace(",", "")) for cell in row[3:6])
    for arch in (f.name for f in families.FAMILIES if f.layer_list):
        total = plan(arch, ["64x4"])["total"]
        assert found.pop(arch) == (total.layers, total.kron["64x4"], total.lora[4]), arch
    assert not found
