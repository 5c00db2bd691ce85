"""`krona compare --study`: the DiffuseKronA paper's claims measured on the toy world, krona against LoRA.

Three parts, every run the same photos, steps, prior preservation and evaluation (the toy world's scores of the
subject on five new backgrounds and of five plain class members, `per_prompt` pictures each, the same seeds):

- **learning-rate sensitivity**: both methods at their lr-sweep setting (krona's `kron_setting`, LoRA rank
  `lora_rank`) over a log grid of learning rates and `seeds` seeds; each run validated every `validate_every`
  steps, which gives the scores against steps too;
- **equal budgets**: at each method's best learning rate (the highest mean subject fidelity whose prompt fidelity is
  at least PROMPT_FLOOR), krona over its factor choices and LoRA over its ranks, against trainable parameters;
- **a check of the maths**: peft's LoKr layers at krona's lr-sweep factors (square ones only: peft takes one factor
  for both sides), krona's learning rate: the same parameters, so the scores must agree within noise.

Each finished run is written to `results.json` at once, so a killed study continues where it stopped when run again
with the same settings. A stop request (Ctrl-C, SIGTERM) is answered within a sampler or training step, with the
runs kept and the command that continues (`stopping`). `report.md` and the plots come from `results.json` alone.

Library code: raises KronaError, never prints; progress goes to a callback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import stopping
from ..atomic import write_bytes_atomic
from ..errors import KronaError

#: The learning-rate grid (log-spaced, 1e-5 to 1e-2), krona's factor choices (A's output side swept with its input
#: side at 4, the paper's best input factor; fitted per layer where a toy layer is narrower) and LoRA's ranks.
LRS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
FACTORS = ("2x4", "4x4", "8x4", "16x4", "32x4", "64x4")
RANKS = (1, 2, 4, 8, 16)
PROMPT_FLOOR = 0.8  # a run that draws the subject off the background asked for does not count as learning it
DRIFT = 0.1  # how far a run may move the plain class's scores from the base model's and still keep the class
NEAR_BEST = 0.9  # the robust range: learning rates within this fraction of a method's best subject fidelity
SCORES = ("subject_fidelity", "prompt_fidelity", "class_accuracy", "class_look_rate")


@dataclass(frozen=True)
class StudyPlan:
    """The study's grid and budget; a study folder holds one plan (changing it needs another folder)."""

    lrs: tuple[float, ...] = LRS
    factors: tuple[str, ...] = FACTORS
    ranks: tuple[int, ...] = RANKS
    seeds: int = 3
    steps: int = 600
    validate_every: int = 150
    per_prompt: int = 4
    kron_setting: str = "4x4"
    lora_rank: int = 4
    lokr: bool = True
    arch: str = "sdxl"  # the toy pipeline studied (without a --pretrained-model of the user's)

    def check(self) -> StudyPlan:
        from ..kron.factors import parse_factors
        from ..pipeline.toy import ARCHS

        if not self.lrs or not self.factors or not self.ranks:
            raise KronaError("a study needs at least one learning rate, one factor setting and one rank")
        if min(self.lrs) <= 0 or self.seeds < 1 or self.steps < 1 or self.per_prompt < 1 or self.validate_every < 0:
            raise KronaError("learning rates, seeds, steps and pictures per prompt must be positive")
        for factors in (*self.factors, self.kron_setting):
            parse_factors(factors)
        if self.arch not in ARCHS:
            raise KronaError(f"--arch {self.arch}: the toy world has {', '.join(ARCHS)} pipelines")
        return self


@dataclass(frozen=True)
class Spec:
    """One training run of the study."""

    part: str  # lr | budget | lokr
    method: str  # kron | lora | lokr
    setting: str  # factors (kron, lokr) or rank (lora)
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-{self.setting}-lr{self.lr:g}-seed{self.seed}"


def lr_specs(plan: StudyPlan) -> list[Spec]:
    settings = {"kron": plan.kron_setting, "lora": str(plan.lora_rank)}
    return [Spec("lr", m, settings[m], lr, s) for m in settings for lr in plan.lrs for s in range(plan.seeds)]


def later_specs(plan: StudyPlan, best: dict[str, float]) -> list[Spec]:
    """The equal-budget runs at each method's best learning rate, and the LoKr check at krona's; the runs the lr
    sweep already made (the same name) are not repeated."""
    seeds = range(plan.seeds)
    specs = [
        Spec("budget", m, setting, best[m], i)
        for m in ("kron", "lora")
        for setting in budget_settings(plan, m)
        for i in seeds
    ]
    if plan.lokr and _square(plan.kron_setting):
        specs += [Spec("lokr", "lokr", plan.kron_setting, best["kron"], i) for i in seeds]
    done = {s.name for s in lr_specs(plan)}
    return [s for s in specs if s.name not in done]


def budget_settings(plan: StudyPlan, method: str) -> list[str]:
    return list(plan.factors) if method == "kron" else [str(r) for r in plan.ranks]


def later_count(plan: StudyPlan) -> int:
    """How many runs `later_specs` makes, whatever the best learning rates turn out to be: every budget setting and
    the LoKr check, but the two lr-sweep settings, which the sweep ran at every lr."""
    settings = len(plan.factors) + len(plan.ranks) + (plan.lokr and _square(plan.kron_setting))
    shared = (plan.kron_setting in plan.factors) + (plan.lora_rank in plan.ranks)
    return plan.seeds * (settings - shared)


def _square(factors: str) -> bool:
    from ..kron.factors import parse_factors

    f = parse_factors(factors)
    return f.a_out == f.a_in


def study_inputs(out: Path, pretrained: str | None, instance_dir: str | None, arch: str = "sdxl") -> tuple[str, str]:
    """(base model, photo folder) of a study: the given ones, or the toy pipeline of ``arch`` and the toy subject's
    photos written into the study folder (kept there, so that a continued study uses the same)."""
    from PIL import Image

    from ..inference.sampling import png_bytes
    from ..pipeline.toy import make_toy
    from ..world.scenes import subject_photos

    if pretrained is None:
        pretrained = str(out / f"toy-{arch}")
        if not (out / f"toy-{arch}" / "model_index.json").exists():
            make_toy(pretrained, arch=arch, overwrite=True)
    if instance_dir is None:
        instance_dir = str(out / "photos")
        for i, (pixels, caption) in enumerate(subject_photos(), 1):
            path = out / "photos" / f"sks-{i:02d}.png"
            if not path.exists():
                write_bytes_atomic(path.with_suffix(".txt"), caption.encode())
                write_bytes_atomic(path, png_bytes(Image.fromarray(pixels), {}))
    return pretrained, instance_dir


def listed(text: str | None, kind: type, default: tuple) -> tuple:
    """A comma-separated option (`--lrs 1e-4,1e-3`) as a tuple of `kind`, or `default` when not given."""
    if not text:
        return default
    try:
        return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise KronaError(f"cannot read '{text}' as a comma-separated list of {kind.__name__}s") from e


def study_setup(
    out: Path,
    plan: StudyPlan,
    config: str | None = None,
    pretrained: str | None = None,
    instance_dir: str | None = None,
    prompt: str | None = None,
    class_prompt: str | None = None,
    steps: int | None = None,
):
    """The training settings and the plan of a study in `out`: the plan checked before anything is written, then
    the toy world's base model and photos unless given, the toy preset unless another config is, and the study's
    own step budget (not the preset's, which the study set: the same command, the same study). Returns
    (TrainConfig, StudyPlan)."""
    from ..training.config import load_config

    plan.check()
    base, photos = study_inputs(out.expanduser(), pretrained, instance_dir, plan.arch)
    overrides = {
        "pretrained_model": base,
        "instance_dir": photos,
        "prompt": prompt or "a photo of sks square",
        "class_prompt": class_prompt or "a photo of a square",
        "steps": steps or StudyPlan.steps,
        "output_dir": str(out),
    }
    cfg = load_config(config or "toy", overrides)
    return cfg, dataclasses.replace(plan, steps=cfg.steps, validate_every=max(cfg.steps // 4, 1))


def study(
    train_config,
    output_dir: str | Path,
    plan: StudyPlan,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Run (or continue) the study in `output_dir`; write results.json, report.md and the plots; return the
    results. `train_config` is a validated TrainConfig of the toy preset with the base model, photos and prompts."""
    plan.check()
    say = progress or (lambda done, total, name: None)
    out = Path(output_dir).expanduser()
    results = _load(out, plan)
    total = len(lr_specs(plan)) + later_count(plan)
    doing = "the study"  # what a stop request cuts short

    def run_all(specs: list[Spec]) -> None:
        nonlocal doing
        for spec in specs:
            if spec.name not in results["runs"]:
                stopping.check()  # between runs
                say(len(results["runs"]), total, spec.name)
                doing = f"run {spec.name}, which starts over"
                started = time.perf_counter()
                results["runs"][spec.name] = _run(train_config, out, plan, spec)
                results["seconds"] = round(results["seconds"] + time.perf_counter() - started, 1)
                _save(out, results)
                doing = "the study"

    with stopping.deferred():
        try:
            if "base" not in results:  # the base model's own scores: what the class drifts from
                from ..inference.sampling import prepare_pipeline, stop_checks
                from .toy import pipeline_scores

                say(len(results["runs"]), total, "base model")
                doing = "the base model's scores"
                with stop_checks(prepare_pipeline([], train_config.pretrained_model)[0]) as pipe:
                    base = pipeline_scores(pipe, plan.per_prompt)
                results["base"] = {k: getattr(base, k) for k in SCORES}
                _save(out, results)
                doing = "the study"
            run_all(lr_specs(plan))
            best = best_lrs(results)
            run_all(later_specs(plan, best))
        except (stopping.StopRequest, stopping.Stopped):
            raise stopping.Stopped(
                f"stopped by {stopping.signal_name()} during {doing}: {len(results['runs'])} of {total} runs are "
                f"kept in {out / 'results.json'}; continue with: {stopping.rerun()}"
            ) from None
    say(len(results["runs"]), total, "report")
    results["summary"] = summarise(results, plan)
    _save(out, results)
    write_report(out, results, train_config)
    return results


def _load(out: Path, plan: StudyPlan) -> dict:
    path = out / "results.json"
    wanted = json.loads(json.dumps(asdict(plan)))  # tuples as lists, as the file holds them
    if not path.exists():
        return {"plan": wanted, "runs": {}, "seconds": 0.0}
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KronaError(f"cannot read the study's {path} ({e}); move it away to start the study again") from e
    if {"arch": "sdxl"} | results.get("plan", {}) != wanted:  # studies before the toy FLUX were of the toy SDXL
        raise KronaError(
            f"{out} holds a study with other settings ({path.name}); run it with the same settings to continue "
            "it, or give another --output-dir"
        )
    return results


def _save(out: Path, results: dict) -> None:
    write_bytes_atomic(out / "results.json", json.dumps(results, indent=1).encode())


def _run(train_config, out: Path, plan: StudyPlan, spec: Spec) -> dict:
    """Train one run, score its last step's adapter on the evaluation prompts; its record for results.json."""
    from ..inference.sampling import prepare_pipeline, stop_checks
    from ..training.train import train
    from .compare import adapter_parameters
    from .toy import pipeline_scores

    validating = spec.part == "lr" and plan.validate_every > 0
    changes = {
        "adapter_type": spec.method,
        "lr": spec.lr,
        "seed": spec.seed,
        "steps": plan.steps,
        "output_dir": str(out / "runs" / spec.name),
        "overwrite": True,
        "resume": None,
        "class_dir": str(out / "class-images"),
        "checkpoint_every": 0,
        "sample_every": plan.validate_every if validating else 0,
        "validate_every": plan.validate_every if validating else 0,
        "scorer": "toy" if validating else "none",
        "keep": "last",
    }
    changes |= {"rank": int(spec.setting)} if spec.method == "lora" else {"factors": spec.setting}
    cfg = dataclasses.replace(train_config, **changes).validate()
    started = time.perf_counter()
    result = train(cfg)
    trained = time.perf_counter() - started
    with stop_checks(prepare_pipeline([(result.adapter, 1.0)], cfg.pretrained_model)[0]) as pipe:
        scores = pipeline_scores(pipe, plan.per_prompt, identifier=cfg.identifier)
    return asdict(spec) | {
        "parameters": adapter_parameters(str(result.adapter)),
        "train_seconds": round(trained, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "scores": {k: getattr(scores, k) for k in SCORES},
        "validation": [
            {"step": p["step"], "subject_fidelity": p["subject_fidelity"], "prompt_fidelity": p["prompt_fidelity"]}
            for p in result.validation
        ],
    }


# --- what the runs say ------------------------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _groups(runs: list[dict]) -> list[dict]:
    """Runs grouped by (method, setting, lr), in the order first seen: each score's spread over their seeds."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["setting"], run["lr"]), []).append(run)
    return [
        {
            "method": v[0]["method"],
            "setting": v[0]["setting"],
            "lr": v[0]["lr"],
            "parameters": v[0]["parameters"],
            "runs": len(v),
            **{s: _spread([r["scores"][s] for r in v]) for s in SCORES},
        }
        for v in groups.values()
    ]


def lr_table(results: dict) -> dict[str, list[dict]]:
    """Per method, the lr sweep's rows in lr order: the lr and each score's spread over seeds."""
    rows = _groups([r for r in results["runs"].values() if r["part"] == "lr"])
    return {m: sorted((r for r in rows if r["method"] == m), key=lambda r: r["lr"]) for m in ("kron", "lora")}


def best_lrs(results: dict) -> dict[str, float]:
    """Each method's best learning rate: the highest mean subject fidelity among those whose mean prompt fidelity
    is at least PROMPT_FLOOR (among all, where none is)."""
    best = {}
    for method, rows in lr_table(results).items():
        if not rows:
            raise KronaError(f"the study holds no lr-sweep run of {method}")
        best[method] = max(
            rows, key=lambda r: (r["prompt_fidelity"]["mean"] >= PROMPT_FLOOR, r["subject_fidelity"]["mean"])
        )["lr"]
    return best


def keeping_the_class(rows: list[dict], base: dict) -> float | None:
    """The learning rate of the highest mean subject fidelity among those whose prompt fidelity holds and whose
    plain class stays within DRIFT of the base model's (class accuracy and look rate): a preset's choice."""
    kept = [
        r
        for r in rows
        if r["prompt_fidelity"]["mean"] >= PROMPT_FLOOR
        and r["class_accuracy"]["mean"] >= base["class_accuracy"] - DRIFT
        and r["class_look_rate"]["mean"] <= base["class_look_rate"] + DRIFT
    ]
    return max(kept, key=lambda r: r["subject_fidelity"]["mean"])["lr"] if kept else None


def robustness(rows: list[dict]) -> dict:
    """The learning rates around the best one (in grid order, without a gap) whose mean subject fidelity is within
    NEAR_BEST of the best and whose prompt fidelity holds: how many, and how many decades they span."""
    ok = [r["prompt_fidelity"]["mean"] >= PROMPT_FLOOR for r in rows]
    if not any(ok):
        return {"best_lr": None, "best": None, "lrs": [], "decades": 0.0}
    i = max((j for j in range(len(rows)) if ok[j]), key=lambda j: rows[j]["subject_fidelity"]["mean"])
    best = rows[i]["subject_fidelity"]["mean"]

    def near(j: int) -> bool:
        return ok[j] and rows[j]["subject_fidelity"]["mean"] >= NEAR_BEST * best

    lo, hi = i, i
    while lo > 0 and near(lo - 1):
        lo -= 1
    while hi < len(rows) - 1 and near(hi + 1):
        hi += 1
    lrs = [rows[j]["lr"] for j in range(lo, hi + 1)]
    return {"best_lr": rows[i]["lr"], "best": best, "lrs": lrs, "decades": math.log10(lrs[-1] / lrs[0])}


def steps_curve(results: dict, best: dict[str, float]) -> dict[str, list[dict]]:
    """Per method, at its best learning rate: the validations' subject and prompt fidelity at each step, over seeds."""
    curves = {}
    for method, lr in best.items():
        runs = [r for r in results["runs"].values() if r["part"] == "lr" and r["method"] == method and r["lr"] == lr]
        steps = sorted({p["step"] for r in runs for p in r["validation"]})
        curves[method] = [
            {
                "step": step,
                **{
                    k: _spread([p[k] for r in runs for p in r["validation"] if p["step"] == step and p[k] is not None])
                    for k in ("subject_fidelity", "prompt_fidelity")
                },
            }
            for step in steps
        ]
    return curves


def near_best_step(curve: list[dict]) -> int | None:
    """The first validation step whose mean subject fidelity is within NEAR_BEST of the curve's best: how many steps
    the method needs."""
    points = [p for p in curve if p["subject_fidelity"]["n"]]
    if not points:
        return None
    best = max(p["subject_fidelity"]["mean"] for p in points)
    return next(p["step"] for p in points if p["subject_fidelity"]["mean"] >= NEAR_BEST * best)


def lokr_check(results: dict, plan: StudyPlan, best: dict[str, float]) -> dict | None:
    """krona against peft's LoKr at the same factors and learning rate: the difference of mean subject fidelity and
    the noise it is measured against (twice the standard error of the difference over seeds)."""
    pick = {
        m: [r for r in results["runs"].values() if r["method"] == m and r["setting"] == plan.kron_setting]
        for m in ("kron", "lokr")
    }
    pick["kron"] = [r for r in pick["kron"] if r["lr"] == best["kron"]]
    if not pick["lokr"] or not pick["kron"]:
        return None
    kron, lokr = (_spread([r["scores"]["subject_fidelity"] for r in pick[m]]) for m in ("kron", "lokr"))
    seeds = min(kron["n"], lokr["n"]) > 1  # one seed has no spread to measure the noise by
    noise = 2 * math.sqrt(kron["sd"] ** 2 / kron["n"] + lokr["sd"] ** 2 / lokr["n"]) if seeds else None
    return {
        "factors": plan.kron_setting,
        "lr": best["kron"],
        "parameters": {m: pick[m][0]["parameters"] for m in pick},
        "kron": kron,
        "lokr": lokr,
        "difference": lokr["mean"] - kron["mean"],
        "noise": noise,
        "within_noise": None if noise is None else abs(lokr["mean"] - kron["mean"]) <= noise,
    }


def _fewer_parameters(results: dict, plan: StudyPlan) -> float:
    """How many fewer parameters krona's lr-sweep setting trains than LoRA's, as a fraction of LoRA's."""
    count = {(r["method"], r["setting"]): r["parameters"] for r in results["runs"].values() if r["part"] == "lr"}
    return 1 - count[("kron", plan.kron_setting)] / count[("lora", str(plan.lora_rank))]


def summarise(results: dict, plan: StudyPlan) -> dict:
    """Every number the report shows, derived from the runs alone."""
    best = best_lrs(results)
    table = lr_table(results)
    curves = steps_curve(results, best)
    at_best = _groups([r for r in results["runs"].values() if r["method"] != "lokr" and r["lr"] == best[r["method"]]])
    return {
        "best_lr": best,
        "lr": table,
        "robustness": {m: robustness(rows) for m, rows in table.items()},
        "base": results.get("base"),
        "keeping_the_class": {m: keeping_the_class(rows, results["base"]) for m, rows in table.items()}
        if results.get("base")
        else None,
        "budget": {
            m: sorted(
                (g for g in at_best if g["method"] == m and (g["setting"] in budget_settings(plan, m))),
                key=lambda g: g["parameters"],
            )
            for m in ("kron", "lora")
        },
        "steps": curves,
        "near_best_step": {m: near_best_step(curve) for m, curve in curves.items()},
        "lokr": lokr_check(results, plan, best),
        "runs": len(results["runs"]),
        "hours": results["seconds"] / 3600,
        "seconds_per_run": statistics.fmean(r["seconds"] for r in results["runs"].values()),
        "train_seconds_per_run": statistics.fmean(r["train_seconds"] for r in results["runs"].values()),
        "fewer_parameters": _fewer_parameters(results, plan),
    }


# --- the report -------------------------------------------------------------------------------------------------------


def _cell(spread: dict) -> str:
    return f"{spread['mean']:.3f} ± {spread['sd']:.3f}"


def write_report(out: Path, results: dict, cfg) -> Path:
    """report.md and its three plots (lr.png, pareto.png, steps.png) from results.json's summary."""
    s, plan = results["summary"], results["plan"]
    plots = _plots(out, s)
    lines = [
        "# krona compare --study: krona against LoRA on the toy world",
        "",
        f"Base `{cfg.pretrained_model}`, photos `{cfg.instance_dir}` (`{cfg.prompt}`), prior preservation "
        f"(`{cfg.class_prompt}`), {plan['steps']} steps, batch {cfg.batch_size}, seeds 0–{plan['seeds'] - 1}; "
        f"each run scored on {plan['per_prompt']} pictures per evaluation prompt. {s['runs']} runs, "
        f"{s['hours']:.2f} h of training and scoring ({s['seconds_per_run']:.0f} s per run, "
        f"{s['train_seconds_per_run']:.0f} s of it training). krona {plan['kron_setting']} trains "
        f"{s['fewer_parameters']:.0%} fewer parameters than LoRA rank {plan['lora_rank']}. Scores are the mean ± "
        "standard deviation over seeds.",
        "",
        "## Learning-rate sensitivity",
        "",
        f"krona {plan['kron_setting']} and LoRA rank {plan['lora_rank']}.",
        "",
        "| method | lr | subject fidelity | prompt fidelity | class accuracy | class look rate |",
        "|---|---|---|---|---|---|",
    ]
    for method, rows in s["lr"].items():
        lines += [f"| {method} | {r['lr']:g} | " + " | ".join(_cell(r[k]) for k in SCORES) + " |" for r in rows]
    lines += [
        "",
        f"Robust range: the learning rates next to the best whose subject fidelity is within {NEAR_BEST:.0%} of the "
        f"best with prompt fidelity ≥ {PROMPT_FLOOR:.0%}.",
        "",
        "| method | best lr | best subject fidelity | robust range | decades |",
        "|---|---|---|---|---|",
    ]
    for method, r in s["robustness"].items():
        if r["best_lr"] is None:
            lines.append(f"| {method} | none with prompt fidelity ≥ {PROMPT_FLOOR:.0%} | | | 0 |")
            continue
        span = f"{r['lrs'][0]:g} – {r['lrs'][-1]:g}" if len(r["lrs"]) > 1 else f"{r['lrs'][0]:g} alone"
        lines.append(f"| {method} | {r['best_lr']:g} | {r['best']:.3f} | {span} | {r['decades']:.2f} |")
    if s.get("keeping_the_class"):
        base = s["base"]
        lines += [
            "",
            f"The base model: subject fidelity {base['subject_fidelity']:.3f}, prompt fidelity "
            f"{base['prompt_fidelity']:.3f}, class accuracy {base['class_accuracy']:.3f}, class look rate "
            f"{base['class_look_rate']:.3f}. The best lr that keeps the plain class within {DRIFT:g} of it "
            "(accuracy and look rate): "
            + ", ".join(f"{m} {'none' if lr is None else f'{lr:g}'}" for m, lr in s["keeping_the_class"].items())
            + ".",
        ]
    lines += ["", f"![scores against lr]({plots['lr']})", "", "## Equal budgets", ""]
    lines += [
        f"Each method at its best learning rate (krona {s['best_lr']['kron']:g}, LoRA {s['best_lr']['lora']:g}).",
        "",
        "| method | setting | parameters | subject fidelity | prompt fidelity | class accuracy | class look rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, rows in s["budget"].items():
        lines += [
            f"| {method} | {r['setting']} | {r['parameters']:,} | " + " | ".join(_cell(r[k]) for k in SCORES) + " |"
            for r in rows
        ]
    lines += ["", f"![subject fidelity against parameters]({plots['pareto']})", "", "## Steps", ""]
    lines += [
        "The validations of the lr sweep's runs at each method's best learning rate (ten pictures each).",
        "",
        "| method | step | subject fidelity | prompt fidelity |",
        "|---|---|---|---|",
    ]
    for method, rows in s["steps"].items():
        lines += [
            f"| {method} | {r['step']} | {_cell(r['subject_fidelity'])} | {_cell(r['prompt_fidelity'])} |"
            for r in rows
            if r["subject_fidelity"]["n"]
        ]
    lines += [
        "",
        f"The first step within {NEAR_BEST:.0%} of the curve's best: "
        + ", ".join(f"{m} {step}" for m, step in s["near_best_step"].items())
        + ".",
        "",
        f"![subject fidelity against steps]({plots['steps']})",
        "",
    ]
    check = s["lokr"]
    if check:
        if check["noise"] is None:
            verdict = "not measured against noise (one seed)"
        else:
            side = "within" if check["within_noise"] else "**outside**"
            verdict = f"{side} the noise (± {check['noise']:.3f}, twice its standard error)"
        lines += [
            "## peft's LoKr at krona's factors",
            "",
            f"Factors {check['factors']}, lr {check['lr']:g}; parameters krona {check['parameters']['kron']:,}, "
            f"LoKr {check['parameters']['lokr']:,}. Subject fidelity krona {_cell(check['kron'])}, LoKr "
            f"{_cell(check['lokr'])}: difference {check['difference']:+.3f}, {verdict}.",
            "",
        ]
    return write_bytes_atomic(out / "report.md", "\n".join(lines).encode())


def _plots(out: Path, s: dict) -> dict[str, str]:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(figure, name: str) -> str:
        buffer = io.BytesIO()
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
        write_bytes_atomic(out / name, buffer.getvalue())
        return name

    def band(axis, xs, spreads, label):
        means = [p["mean"] for p in spreads]
        axis.plot(xs, means, marker="o", label=label)
        axis.fill_between(xs, [p["min"] for p in spreads], [p["max"] for p in spreads], alpha=0.2)

    names = {}
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for axis, key, title in zip(axes, ("subject_fidelity", "prompt_fidelity"), ("subject fidelity", "prompt fidelity")):
        for method, rows in s["lr"].items():
            band(axis, [r["lr"] for r in rows], [r[key] for r in rows], method)
        axis.set_xscale("log")
        axis.set_xlabel("learning rate")
        axis.set_title(title + " (band: min–max over seeds)")
        axis.legend()
    names["lr"] = save(figure, "lr.png")

    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for method, rows in s["budget"].items():
        xs = [r["parameters"] for r in rows]
        axis.errorbar(
            xs,
            [r["subject_fidelity"]["mean"] for r in rows],
            yerr=[r["subject_fidelity"]["sd"] for r in rows],
            marker="o",
            capsize=3,
            label=method,
        )
        for x, r in zip(xs, rows):
            axis.annotate(r["setting"], (x, r["subject_fidelity"]["mean"]), fontsize=7)
    if s["lokr"]:
        axis.errorbar(
            [s["lokr"]["parameters"]["lokr"]],
            [s["lokr"]["lokr"]["mean"]],
            yerr=[s["lokr"]["lokr"]["sd"]],
            marker="s",
            capsize=3,
            linestyle="none",
            label="peft LoKr",
        )
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters")
    axis.set_ylabel("subject fidelity")
    axis.legend()
    names["pareto"] = save(figure, "pareto.png")

    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for method, rows in s["steps"].items():
        rows = [r for r in rows if r["subject_fidelity"]["n"]]
        band(axis, [r["step"] for r in rows], [r["subject_fidelity"] for r in rows], method)
    axis.set_xlabel("step")
    axis.set_ylabel("subject fidelity (validation)")
    axis.legend()
    names["steps"] = save(figure, "steps.png")
    return names
