"""`krona compare` and `krona eval` end to end on the tiny pipelines with tiny local CLIP and DINO models."""

import json
from pathlib import Path

import pytest

from krona_cli.cli import main
from krona_cli.errors import KronaError
from krona_cli.evaluation.compare import PROMPT_SETS, class_noun, parse_sweep, prompt_set

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "cat"
PROMPT = "a photo of sks cat"


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    from krona_cli.pipeline.tiny import make_tiny_clip, make_tiny_dino

    root = tmp_path_factory.mktemp("scorers")
    return make_tiny_clip(root / "clip"), make_tiny_dino(root / "dino")


def test_prompt_sets_sweeps_and_class_nouns():
    assert {name: len(t) for name, t in PROMPT_SETS.items()} == {"object": 25, "live": 25}
    live = prompt_set("live", "sks", "dog")
    assert "a sks dog wearing a santa hat" in live and len(set(live)) == 25
    assert "a sks dog floating in an ocean of milk" in prompt_set("object", "sks", "dog")
    assert parse_sweep("lr=1e-4, 5e-4") == ("lr", [1e-4, 5e-4]) and parse_sweep(None) == (None, [None])
    assert parse_sweep("factors=64x4,8x64") == ("factors", ["64x4", "8x64"]) and parse_sweep("rank=4,8")[1] == [4, 8]
    for bad in ("lr", "speed=1,2", "rank=four", "lr="):
        with pytest.raises(KronaError, match="--sweep"):
            parse_sweep(bad)
    assert class_noun("a photo of sks dog", "sks") == "dog"
    with pytest.raises(KronaError, match="--class-noun"):
        class_noun("a photo of a dog", "sks")


@pytest.mark.slow
def test_compare_with_a_two_value_sweep_writes_the_report(tiny_sdxl_dir, tmp_path, scorers, capsys):
    clip, dino = scorers
    out = tmp_path / "compare"
    code = main(
        [
            "compare",
            "--config",
            "tiny",
            "--pretrained-model",
            str(tiny_sdxl_dir),
            "--instance-dir",
            str(EXAMPLES),
            "--prompt",
            PROMPT,
            "--class-prompt",
            "a photo of a cat",
            "--output-dir",
            str(out),
            "--steps",
            "4",
            "--sweep",
            "lr=1e-3,5e-3",
            "--num-images",
            "1",
            "--sample-steps",
            "2",
            "--clip-model",
            str(clip),
            "--dino-model",
            str(dino),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = json.loads((out / "results.json").read_text())
    runs = {(r["method"], r["setting"]) for r in results["runs"]}
    assert runs == {("kron", 1e-3), ("kron", 5e-3), ("lora", 1e-3), ("lora", 5e-3)}
    for run in results["runs"]:
        assert all(0.0 < run["metrics"][m] <= 1.0 + 1e-6 for m in ("clip_i", "dino")), run
        assert len(list(Path(run["samples"]).glob("p*-s*.png"))) == 25  # the live prompt set, one seed each
    kron = next(r for r in results["runs"] if r["method"] == "kron")
    lora = next(r for r in results["runs"] if r["method"] == "lora")
    assert kron["parameters"] != lora["parameters"]
    report = (out / "report.md").read_text()
    assert "| kron |" in report and "| lora |" in report and "plot.png" in report
    for name in ("grids/lr-0.001.png", "grids/lr-0.005.png", "plot.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        assert name in report
    assert len(list((out / "class-images").glob("*.png"))) == 8  # shared by every run, generated once


def test_eval_scores_a_folder_and_writes_json(tiny_sdxl_dir, tmp_path, scorers, capsys):
    clip, dino = scorers
    output = tmp_path / "metrics.json"
    code = main(
        [
            "eval",
            "--images",
            str(EXAMPLES),
            "--reference",
            str(EXAMPLES),
            "--prompt",
            PROMPT,
            "--output",
            str(output),
            "--clip-model",
            str(clip),
            "--dino-model",
            str(dino),
        ]
    )
    assert code == 0, capsys.readouterr().err
    metrics = json.loads(output.read_text())
    assert metrics["generated"] == metrics["reference"] == 5 and 0 < metrics["clip_i"] <= 1.0 + 1e-6


def test_eval_without_a_model_names_the_flag(tmp_path, scorers, capsys):
    clip, _ = scorers
    code = main(
        [
            "eval",
            "--images",
            str(EXAMPLES),
            "--reference",
            str(EXAMPLES),
            "--clip-model",
            str(clip),
            "--dino-model",
            str(tmp_path / "no-such-dino"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--dino-model" in err and "Traceback" not in err


@pytest.mark.slow
def test_compare_scores_toy_runs_with_the_toy_scorers(toy_sdxl_dir, tmp_path, capsys):
    """On a toy pipeline and the toy subject, `--scorer toy` needs no scorer model: the table, JSON and report carry
    the toy world's four scores."""
    out = tmp_path / "compare"
    subject = Path(__file__).resolve().parent.parent / "examples" / "toy-subject"
    args = ["compare", "--config", "toy", "--pretrained-model", str(toy_sdxl_dir), "--instance-dir", str(subject)]
    args += ["--prompt", "a photo of sks square", "--output-dir", str(out), "--steps", "3", "--num-images", "1"]
    code = main(args + ["--sample-steps", "3", "--scorer", "toy"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == {"kron", "lora"}
    for run in results["runs"]:
        assert set(run["metrics"]) == {"subject_fidelity", "prompt_fidelity", "class_accuracy", "class_look_rate"}
        assert all(0.0 <= v <= 1.0 for v in run["metrics"].values()), run
    report = (out / "report.md").read_text()
    assert "subject fidelity" in report and "class look rate" in report


def test_eval_follows_the_output_rules(tmp_path, capsys, monkeypatch):
    """--output is checked before anything is scored; an existing file is replaced only with --overwrite, and only if
    krona eval wrote it; a place that cannot be written is one line, exit 2."""
    import krona_cli.evaluation.toy as toy

    scored = []
    score_files = toy.score_files
    monkeypatch.setattr(toy, "score_files", lambda *a: scored.append(1) or score_files(*a))
    toy_photos = EXAMPLES.parent / "toy-subject"
    args = ["eval", "--scorer", "toy", "--images", str(toy_photos), "--prompt", "a photo of sks square"]
    theirs = tmp_path / "theirs.json"
    theirs.write_text('{"mine": 1}')
    for output, extra in ((theirs, []), (theirs, ["--overwrite"]), ("/proc/krona-x.json", []), ("m.txt", [])):
        assert main([*args, "--output", str(output), *extra]) == 2
    err = capsys.readouterr().err
    assert "exists; pass --overwrite" in err and "was not written by krona eval" in err and "cannot be written" in err
    assert theirs.read_text() == '{"mine": 1}' and not scored
    ours = tmp_path / "m.json"
    assert main([*args, "--output", str(ours)]) == 0 and len(scored) == 1
    assert main([*args, "--output", str(ours)]) == 2 and len(scored) == 1
    assert main([*args, "--output", str(ours), "--overwrite"]) == 0 and len(scored) == 2
    assert json.loads(ours.read_text())["written_by"] == "krona eval"
