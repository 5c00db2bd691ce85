"""`krona compare --study` in small (2 learning rates × 2 settings per method × 1 seed, a few steps) on the toy SDXL:
killed part-way, it continues where it stopped; the report's numbers are results.json's; another plan in the same
folder is refused. The study's logic (best learning rate, robust range) on hand-made records."""

import dataclasses
import json
from pathlib import Path

import pytest

from krona_cli.architectures import CONFIGS_DIR
from krona_cli.cli import main
from krona_cli.errors import KronaError
from krona_cli.evaluation import study
from krona_cli.evaluation.study_report import write_report
from krona_cli.training.config import load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "toy-subject"
PLAN = study.StudyPlan(
    lrs=(1e-3, 1e-2), factors=("4x4", "8x4"), ranks=(2, 4), seeds=1, steps=4, validate_every=1, per_prompt=1
)


class Stop(Exception):
    pass


@pytest.mark.slow
def test_a_killed_study_continues_where_it_stopped(toy_sdxl_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    preset = (CONFIGS_DIR / "toy.yaml").read_text().replace("num-class-images: 24", "num-class-images: 2")
    assert "num-class-images: 2\n" in preset
    (tmp_path / "small.yaml").write_text(preset)
    settings = dict(
        pretrained_model=str(toy_sdxl_dir),
        instance_dir=str(EXAMPLES),
        prompt="a photo of sks square",
        class_prompt="a photo of a square",
        output_dir=str(out),
        steps=4,
    )
    cfg = load_config(str(tmp_path / "small.yaml"), settings)
    trained = []
    run = study._run
    monkeypatch.setattr(study, "_run", lambda *a: trained.append(a[-1].name) or run(*a))

    def stop_after_three(done, total, name):
        assert total == 7  # 2 methods x 2 lrs, then krona 8x4, LoRA rank 2 and LoKr 4x4 at the best lrs
        if done == 3:
            raise Stop

    with pytest.raises(Stop):
        study.study(cfg, out, PLAN, stop_after_three)
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 3 and len(trained) == 3

    # the same plan from the command line: the 4 runs left, then the report
    command = ["compare", "--study", "--output-dir", str(out), "--config", str(tmp_path / "small.yaml")]
    command += ["--pretrained-model", str(toy_sdxl_dir), "--instance-dir", str(EXAMPLES), "--steps", "4"]
    command += ["--lrs", "1e-3,1e-2", "--factors", "4x4,8x4", "--ranks", "2,4", "--seeds", "1", "--num-images", "1"]
    assert main(command) == 0
    assert "best lr" in capsys.readouterr().out
    assert len(trained) == 7 and len(set(trained)) == 7
    results = json.loads((out / "results.json").read_text())
    runs, summary = results["runs"], results["summary"]
    assert set(results["base"]) == {*study.SCORES, study.CLOSENESS}
    assert set(summary["keeping_the_class"]) == {"kron", "lora"}
    assert {r["method"] for r in runs.values()} == {"kron", "lora", "lokr"} and len(runs) == 7
    best = summary["best_lr"]
    assert {(r["method"], r["setting"]) for r in runs.values() if r["part"] == "budget"} == {
        ("kron", "8x4"),
        ("lora", "2"),
    }
    assert all(r["lr"] == best[r["method"]] for r in runs.values() if r["part"] == "budget")
    assert (
        runs[f"lokr-4x4-lr{best['kron']:g}-seed0"]["parameters"]
        == runs[f"kron-4x4-lr{best['kron']:g}-seed0"]["parameters"]
    )
    assert all(len(r["validation"]) == 5 for r in runs.values() if r["part"] == "lr")  # steps 0..4
    for name in ("report.md", "lr.png", "pareto.png", "steps.png"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    for method, rows in summary["lr"].items():
        for row in rows:
            cells = " | ".join(f"{row[k]['mean']:.3f} ± {row[k]['sd']:.3f}" for k in study.SCORES)
            assert f"| {method} | {row['lr']:g} | {cells} |" in report
    for method, rows in summary["budget"].items():
        assert [r["setting"] for r in rows] == sorted(
            [r["setting"] for r in rows], key=lambda s: next(r["parameters"] for r in rows if r["setting"] == s)
        )
        for row in rows:
            assert f"| {method} | {row['setting']} | {row['parameters']:,} | " in report

    # run again: nothing to train; another plan in the folder is refused
    assert main(command) == 0 and len(trained) == 7
    with pytest.raises(KronaError, match="other settings"):
        study.study(cfg, out, study.StudyPlan(lrs=(1e-3,), factors=("4x4",), ranks=(4,), seeds=1, steps=4))


def _rows(means: list[float], prompts: list[float] | None = None, classes: list[float] | None = None) -> list[dict]:
    prompts = prompts or [1.0] * len(means)
    classes = classes or [1.0] * len(means)
    return [
        {
            "lr": lr,
            "subject_fidelity": {"mean": m},
            "prompt_fidelity": {"mean": p},
            "class_accuracy": {"mean": c},
            "class_look_rate": {"mean": 0.0},
        }
        for lr, m, p, c in zip(study.LRS, means, prompts, classes)
    ]


def test_a_presets_lr_is_the_best_that_keeps_the_class():
    base = {"class_accuracy": 0.95, "class_look_rate": 0.0}
    rows = _rows([0.0, 0.1, 0.2, 0.3, 0.5, 0.4, 0.1], classes=[1, 1, 1, 0.9, 0.8, 0.5, 0.5])
    assert study.keeping_the_class(rows, base) == 3e-4  # 1e-3 draws the subject best, but the class drops 15 points
    assert study.keeping_the_class(rows, base | {"class_accuracy": 0.85}) == 1e-3
    assert study.keeping_the_class(rows, base | {"class_look_rate": -0.5}) is None


def test_a_learning_rate_free_default_must_reach_95_percent_of_the_best_tuned_and_keep_the_class():
    base = {"class_accuracy": 0.95, "class_look_rate": 0.0}
    tuned = _rows([0.0, 0.1, 0.2, 0.3, 0.5, 0.4, 0.1], classes=[1, 1, 1, 0.9, 0.8, 0.5, 0.5])  # kept up to 3e-4
    prodigy = [r | {"lr": lr} for r, lr in zip(_rows([0.2, 0.29, 0.1]), (0.3, 1.0, 3.0))]
    free = study.learning_rate_free({"kron": tuned, "kron prodigy": prodigy}, base)
    assert free["tuned_lr"] == 3e-4 and free["share"] == pytest.approx(0.29 / 0.3) and free["meets"]
    prodigy[1]["subject_fidelity"]["mean"] = 0.28  # 93%
    assert not study.learning_rate_free({"kron": tuned, "kron prodigy": prodigy}, base)["meets"]
    prodigy[1] |= {"subject_fidelity": {"mean": 0.6}, "class_accuracy": {"mean": 0.8}}  # more, but the class drifts
    assert not study.learning_rate_free({"kron": tuned, "kron prodigy": prodigy}, base)["meets"]
    assert study.learning_rate_free({"kron": tuned}, base) is None


def test_the_robust_range_is_the_unbroken_run_of_near_best_learning_rates():
    # lrs 1e-5 ... 1e-2; best at 3e-4 (0.5); 1e-4 and 1e-3 within 90%; 1e-2 is too but not next to them
    wide = study.robustness(_rows([0.0, 0.1, 0.46, 0.5, 0.47, 0.2, 0.49]))
    assert wide["best_lr"] == 3e-4 and wide["lrs"] == [1e-4, 3e-4, 1e-3]
    assert wide["decades"] == pytest.approx(1.0)
    # the best subject fidelity off the asked background does not count, nor does it join the range
    strict = study.robustness(_rows([0.0, 0.1, 0.46, 0.9, 0.47, 0.2, 0.1], [1, 1, 1, 0.6, 1, 1, 1]))
    assert strict["best_lr"] == 1e-3 and strict["lrs"] == [1e-3] and strict["decades"] == 0
    assert study.robustness(_rows([0.5] * 7, [0.5] * 7))["best_lr"] is None
    # above a floor (the base model's score): 0.45 is within 90% of 0.5 but not of its 0.4 gain over 0.1
    assert study.robustness(_rows([0.1, 0.1, 0.45, 0.5, 0.47, 0.2, 0.49]))["lrs"] == [1e-4, 3e-4, 1e-3]
    assert study.robustness(_rows([0.1, 0.1, 0.45, 0.5, 0.47, 0.2, 0.49]), floor=0.1)["lrs"] == [3e-4, 1e-3]


def test_bad_study_options_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "study"
    for bad, says in (
        (["--lrs", "1e-3,fast"], "comma-separated list of floats"),
        (["--factors", "4x4x"], "not of the form OxI"),
        (["--lrs", "0,1e-3"], "must be positive"),
        (["--arch", "sd3"], "--arch sd3: the toy world has sdxl, sd15, flux pipelines"),
    ):
        assert main(["compare", "--study", "--output-dir", str(out), *bad]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1 and not out.exists()
    assert main(["compare", "--output-dir", str(out)]) == 2
    assert "--instance-dir and --prompt (or --study" in capsys.readouterr().err
    assert main(["compare", "--output-dir", str(out), "--instance-dir", "x", "--prompt", "p", "--ranks", "4"]) == 2
    assert "size the --study" in capsys.readouterr().err and not out.exists()


def test_a_study_of_the_toy_flux_writes_its_own_base_and_keeps_apart_from_an_sdxl_study(tmp_path):
    """`--arch flux` makes the toy FLUX the study's base; a folder is one study, so the toy SDXL's results (those
    written before studies had an arch included) are not continued as the toy FLUX's."""
    out = tmp_path / "study"
    cfg, plan = study.study_setup(out, study.StudyPlan(arch="flux", steps=4))
    assert cfg.pretrained_model == str(out / "toy-flux") and plan.arch == "flux"
    assert json.loads((out / "toy-flux" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert len(list((out / "photos").glob("*.png"))) == 5
    sdxl = json.loads(json.dumps(dataclasses.asdict(study.StudyPlan(steps=4))))
    del sdxl["arch"]  # a results.json of before
    (out / "results.json").write_text(json.dumps({"plan": sdxl, "runs": {}, "seconds": 0.0}))
    assert study._load(out, study.StudyPlan(steps=4))["plan"] == sdxl
    with pytest.raises(KronaError, match="other settings"):
        study._load(out, plan)


@pytest.mark.parametrize("folder", ["fidelity", "fidelity/flux", "fidelity/robustness"])
def test_the_tables_of_docs_fidelity_are_the_report_of_its_results(folder, tmp_path):
    """docs/fidelity.md shows the studies' tables as `krona compare --study` wrote them from the shipped
    docs/fidelity/results.json (the toy SDXL), docs/fidelity/flux/results.json (the toy FLUX) and
    docs/fidelity/robustness/results.json (optimizers and inits at 5 seeds), and each file's summary is what its runs
    give."""
    from types import SimpleNamespace

    docs = Path(__file__).resolve().parent.parent / "docs"
    results = json.loads((docs / folder / "results.json").read_text())
    plan = study.StudyPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in results["plan"].items()})
    assert json.loads(json.dumps(study.summarise(results, plan))) == results["summary"]
    cfg = SimpleNamespace(pretrained_model="", instance_dir="", prompt="", class_prompt="", batch_size=2)
    rows = [line for line in write_report(tmp_path, results, cfg).read_text().splitlines() if line.startswith("|")]
    text = (docs / "fidelity.md").read_text()
    assert len(rows) > 20 and [row for row in rows if row not in text] == []


def test_the_steps_a_method_needs_are_the_first_within_reach_of_its_best():
    def curve(means):
        return [{"step": 150 * i, "subject_fidelity": {"mean": m, "n": 3}} for i, m in enumerate(means)]

    assert study.near_best_step(curve([0.0, 0.2, 0.458, 0.519, 0.436])) == 450  # 0.458 is 88% of 0.519
    assert study.near_best_step(curve([0.0, 0.47, 0.519])) == 150
    assert study.near_best_step([{"step": 0, "subject_fidelity": {"n": 0}}]) is None


@pytest.mark.slow
def test_the_optimizer_and_transfer_dimensions_resume_after_a_kill(toy_sdxl_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    preset = (CONFIGS_DIR / "toy.yaml").read_text().replace("num-class-images: 24", "num-class-images: 2")
    (tmp_path / "small.yaml").write_text(preset)
    settings = dict(pretrained_model=str(toy_sdxl_dir), instance_dir=str(EXAMPLES), prompt="a photo of sks square")
    settings |= dict(class_prompt="a photo of a square", output_dir=str(out), steps=2)
    cfg = load_config(str(tmp_path / "small.yaml"), settings)
    plan = study.StudyPlan(
        lrs=(1e-3,),
        factors=("4x4",),
        ranks=(4,),
        seeds=1,
        steps=2,
        validate_every=1,
        per_prompt=1,
        optimizers=("adamw", "prodigy", "adamw-schedulefree"),
        multipliers=(1.0,),
        inits=("normal", "invariant"),
        transfer=("4x4", "8x4"),
        transfer_lrs=(1e-3,),
    )
    trained = []
    run = study._run
    monkeypatch.setattr(study, "_run", lambda *a: trained.append(a[-1].name) or run(*a))

    def stop_in_the_transfer_part(done, total, name):
        assert total == 7  # krona AdamW, LoRA, Prodigy, schedule-free; LoKr; 8x4 under each init (4x4: the sweep's)
        if done == 6:
            raise Stop

    with pytest.raises(Stop):
        study.study(cfg, out, plan, stop_in_the_transfer_part)
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 6

    # the same plan from the command line: the run left, then the report
    command = ["compare", "--study", "--output-dir", str(out), "--config", str(tmp_path / "small.yaml")]
    command += ["--pretrained-model", str(toy_sdxl_dir), "--instance-dir", str(EXAMPLES), "--steps", "2"]
    command += ["--lrs", "1e-3", "--factors", "4x4", "--ranks", "4", "--seeds", "1", "--num-images", "1"]
    command += ["--optimizers", "adamw,prodigy,adamw-schedulefree", "--multipliers", "1", "--inits", "normal,invariant"]
    command += ["--transfer", "4x4,8x4", "--transfer-lrs", "1e-3"]
    assert main(command) == 0
    assert "the best lr moves" in capsys.readouterr().out
    assert trained == [
        "kron-4x4-lr0.001-seed0",
        "lora-4-lr0.001-seed0",
        "kron-4x4-lr1-seed0-prodigy",
        "kron-4x4-lr0.001-seed0-adamw-schedulefree",
        "lokr-4x4-lr0.001-seed0",
        "kron-8x4-lr0.001-seed0",
        "kron-8x4-lr0.001-seed0-invariant",
    ]
    results = json.loads((out / "results.json").read_text())
    runs, summary = results["runs"], results["summary"]
    assert runs["kron-4x4-lr1-seed0-prodigy"]["optimizer"] == "prodigy"
    assert summary["lokr"]["kron"]["n"] == 1  # AdamW's run alone, not schedule-free's at the same setting and lr
    assert all(r["scores"]["subject_closeness"] is not None for r in runs.values())
    variants = {"kron", "lora", "kron prodigy", "kron adamw-schedulefree"}
    assert set(summary["robustness"]) == set(summary["robustness_closeness"]) == variants
    transfer = summary["transfer"]
    assert set(transfer) == {"normal", "invariant"}
    # invariant at 4x4 draws A as normal does: the same (lr sweep's) run in both rows
    assert transfer["invariant"]["factors"]["4x4"]["rows"] == transfer["normal"]["factors"]["4x4"]["rows"]
    assert all(part["moves"] == 0.0 for part in transfer.values())  # one lr: it cannot move
    report = (out / "report.md").read_text()
    assert "## Does the best learning rate hold across factors?" in report and "By subject closeness" in report
    assert "| invariant | 8x4 | 0.001 |" in report and "| kron prodigy | 1 |" in report
    assert "Prodigy at its default (lr 1)" in report
