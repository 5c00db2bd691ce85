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

Two further dimensions, off unless asked: `optimizers` besides AdamW (Prodigy over `multipliers` of its own step
size, schedule-free AdamW over the lr grid) join krona's lr sweep; and the **transfer** part trains krona at each of
`transfer` factor settings under each of `inits` (`--kron-init`) over `transfer_lrs`: whether the best learning
rate holds when the factors change. Every run is scored by subject fidelity and by subject closeness (a continuous
score, `world/scorers.py`); the robust ranges are given by both.

Each finished run is written to `results.json` at once, so a killed study continues where it stopped when run again
with the same settings. A stop request (Ctrl-C, SIGTERM) is answered within a sampler or training step, with the
runs kept and the command that continues (`stopping`). `report.md` and the plots come from `results.json` alone
(study_report.py).

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
from ..paths import expand

#: The learning-rate grid (log-spaced, 1e-5 to 1e-2), krona's factor choices (A's output side swept with its input
#: side at 4, the paper's best input factor; fitted per layer where a toy layer is narrower) and LoRA's ranks.
LRS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
MULTIPLIERS = (0.1, 0.3, 1.0, 3.0, 10.0)  # Prodigy's --lr: a multiplier of its own estimate, a decade either side of 1
FACTORS = ("2x4", "4x4", "8x4", "16x4", "32x4", "64x4")
RANKS = (1, 2, 4, 8, 16)
PROMPT_FLOOR = 0.8  # a run that draws the subject off the background asked for does not count as learning it
DRIFT = 0.1  # how far a run may move the plain class's scores from the base model's and still keep the class
NEAR_BEST = 0.9  # the robust range: learning rates within this fraction of a method's best subject fidelity
LR_FREE = 0.95  # a learning-rate-free default must reach this share of the best tuned subject fidelity
SCORES = ("subject_fidelity", "prompt_fidelity", "class_accuracy", "class_look_rate")
CLOSENESS = "subject_closeness"  # recorded beside SCORES (runs before it have none)


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
    optimizers: tuple[str, ...] = ("adamw",)  # krona's lr sweep with each (LoRA: AdamW)
    multipliers: tuple[float, ...] = MULTIPLIERS  # Prodigy's lr grid
    inits: tuple[str, ...] = ("normal",)  # the transfer part's --kron-init values
    transfer: tuple[str, ...] = ()  # the transfer part's factor settings (none: no transfer part)
    transfer_lrs: tuple[float, ...] = ()

    def check(self) -> StudyPlan:
        from ..kron.factors import INITS, parse_factors
        from ..pipeline.toy import ARCHS
        from ..training.optimizers import OPTIMIZERS

        if not self.lrs or not self.factors or not self.ranks:
            raise KronaError("a study needs at least one learning rate, one factor setting and one rank")
        if min(self.lrs) <= 0 or self.seeds < 1 or self.steps < 1 or self.per_prompt < 1 or self.validate_every < 0:
            raise KronaError("learning rates, seeds, steps and pictures per prompt must be positive")
        for factors in (*self.factors, self.kron_setting, *self.transfer):
            parse_factors(factors)
        for name, given, known in (("optimizer", self.optimizers, OPTIMIZERS), ("init", self.inits, INITS)):
            odd = [g for g in given if g not in known]
            if odd:
                raise KronaError(f"unknown {name} '{odd[0]}' in the study's plan; use {', '.join(known)}")
        if "adamw" not in self.optimizers:
            raise KronaError("the study's optimizers must include adamw (LoRA's, and what the other parts use)")
        if (
            bool(self.transfer) != bool(self.transfer_lrs)
            or min((*self.transfer_lrs, *self.multipliers), default=1) <= 0
        ):
            raise KronaError("the transfer part needs factor settings and positive learning rates, both or neither")
        if self.arch not in ARCHS:
            raise KronaError(f"--arch {self.arch}: the toy world has {', '.join(ARCHS)} pipelines")
        return self


@dataclass(frozen=True)
class Spec:
    """One training run of the study."""

    part: str  # lr | budget | lokr | transfer
    method: str  # kron | lora | lokr
    setting: str  # factors (kron, lokr) or rank (lora)
    lr: float
    seed: int
    optimizer: str = "adamw"
    init: str = "normal"  # --kron-init

    @property
    def name(self) -> str:
        extra = "".join(f"-{v}" for v, default in ((self.optimizer, "adamw"), (self.init, "normal")) if v != default)
        return f"{self.method}-{self.setting}-lr{self.lr:g}-seed{self.seed}{extra}"


def variant(run: dict) -> str:
    """What a run's lr-sweep row is called: its method, and its optimizer where that is not AdamW."""
    optimizer = run.get("optimizer", "adamw")  # runs before the optimizers were a dimension: AdamW
    return run["method"] if optimizer == "adamw" else f"{run['method']} {optimizer}"


def lr_specs(plan: StudyPlan) -> list[Spec]:
    """The lr sweep: krona and LoRA with AdamW, and krona with each further optimizer (Prodigy over its
    multipliers)."""
    settings = {"kron": plan.kron_setting, "lora": str(plan.lora_rank)}
    specs = [Spec("lr", m, settings[m], lr, s) for m in settings for lr in plan.lrs for s in range(plan.seeds)]
    for optimizer in (o for o in plan.optimizers if o != "adamw"):
        lrs = plan.multipliers if optimizer == "prodigy" else plan.lrs
        specs += [Spec("lr", "kron", plan.kron_setting, lr, s, optimizer) for lr in lrs for s in range(plan.seeds)]
    return specs


def transfer_specs(plan: StudyPlan) -> list[Spec]:
    """krona with AdamW at each transfer factor setting, init and learning rate; the lr sweep's runs are not
    repeated."""
    specs = [
        Spec("transfer", "kron", factors, lr, s, init=_init_of(factors, init))
        for init in plan.inits
        for factors in plan.transfer
        for lr in plan.transfer_lrs
        for s in range(plan.seeds)
    ]
    done = {s.name for s in lr_specs(plan)}
    return [s for s in specs if s.name not in done]


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


def _init_of(factors: str, init: str) -> str:
    """The init a transfer run at these factors trains with: `invariant` where it draws A as `normal` does
    (a_out³·a_in = 16², e.g. 4x4) is `normal`, so those are the same runs, made once."""
    from ..kron.factors import INVARIANT_REFERENCE, parse_factors

    f = parse_factors(factors)
    return "normal" if init == "invariant" and f.a_out**3 * f.a_in == INVARIANT_REFERENCE**2 else init


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
    base, photos = study_inputs(expand(out), pretrained, instance_dir, plan.arch)
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
    out = expand(output_dir)
    results = _load(out, plan)
    total = len(lr_specs(plan)) + later_count(plan) + len(transfer_specs(plan))
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
            # the base model's own scores: what the class drifts from (again where a study began before closeness)
            if CLOSENESS not in results.get("base", {}):
                from ..inference.sampling import prepare_pipeline, stop_checks
                from .toy import pipeline_scores

                say(len(results["runs"]), total, "base model")
                doing = "the base model's scores"
                with stop_checks(prepare_pipeline([], train_config.pretrained_model)[0]) as pipe:
                    base = pipeline_scores(pipe, plan.per_prompt)
                results["base"] = {k: getattr(base, k) for k in (*SCORES, CLOSENESS)}
                _save(out, results)
                doing = "the study"
            run_all(lr_specs(plan))
            best = best_lrs(results)
            run_all(later_specs(plan, best))
            run_all(transfer_specs(plan))
        except (stopping.StopRequest, stopping.Stopped):
            raise stopping.Stopped(
                f"stopped by {stopping.signal_name()} during {doing}: {len(results['runs'])} of {total} runs are "
                f"kept in {out / 'results.json'}; continue with: {stopping.rerun()}"
            ) from None
    say(len(results["runs"]), total, "report")
    results["summary"] = summarise(results, plan)
    _save(out, results)
    from .study_report import write_report

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
    # a plan written before a field existed has that field's default (the toy SDXL; no optimizer, init or transfer)
    if json.loads(json.dumps(asdict(StudyPlan()))) | results.get("plan", {}) != wanted:
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
        "optimizer": spec.optimizer,
        "kron_init": spec.init,
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
        "scores": {k: getattr(scores, k) for k in (*SCORES, CLOSENESS)},
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
    """Runs grouped by (variant, setting, lr, init), in the order first seen: each score's spread over their seeds
    (subject closeness where every run of the group has it)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((variant(run), run["setting"], run["lr"], run.get("init", "normal")), []).append(run)
    return [
        {
            "method": variant(v[0]),
            "setting": v[0]["setting"],
            "lr": v[0]["lr"],
            "parameters": v[0]["parameters"],
            "runs": len(v),
            **{s: _spread([r["scores"][s] for r in v]) for s in SCORES},
            **({CLOSENESS: _spread([r["scores"][CLOSENESS] for r in v])} if _closeness(v) else {}),
        }
        for v in groups.values()
    ]


def _closeness(runs: list[dict]) -> bool:
    return bool(runs) and all(r["scores"].get(CLOSENESS) is not None for r in runs)


def lr_table(results: dict) -> dict[str, list[dict]]:
    """Per variant (krona, LoRA, krona with each further optimizer), the lr sweep's rows in lr order: the lr and each
    score's spread over seeds."""
    rows = _groups([r for r in results["runs"].values() if r["part"] == "lr"])
    names = dict.fromkeys(["kron", "lora", *(r["method"] for r in rows)])
    return {m: sorted((r for r in rows if r["method"] == m), key=lambda r: r["lr"]) for m in names}


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


def _keeps(row: dict, base: dict) -> bool:
    """Whether a row's prompt fidelity holds and its plain class stays within DRIFT of the base model's (class accuracy
    and look rate)."""
    return (
        row["prompt_fidelity"]["mean"] >= PROMPT_FLOOR
        and row["class_accuracy"]["mean"] >= base["class_accuracy"] - DRIFT
        and row["class_look_rate"]["mean"] <= base["class_look_rate"] + DRIFT
    )


def _best_keeping(rows: list[dict], base: dict) -> dict | None:
    """The row of the highest mean subject fidelity among those that `_keeps`; None when none does."""
    kept = [r for r in rows if _keeps(r, base)]
    return max(kept, key=lambda r: r["subject_fidelity"]["mean"]) if kept else None


def learning_rate_free(table: dict[str, list[dict]], base: dict) -> dict | None:
    """Prodigy at its default multiplier (1) against krona's best tuned AdamW run (the highest mean subject fidelity
    with prompt fidelity held and the class kept): its share of that subject fidelity, whether it keeps the class,
    and whether it `meets` the bar for a default (LR_FREE of the tuned, class kept); None without both."""
    default = next((r for r in table.get("kron prodigy", []) if r["lr"] == 1.0), None)
    best = _best_keeping(table.get("kron", []), base)
    if default is None or best is None:
        return None
    tuned_best = best["subject_fidelity"]["mean"]
    share = default["subject_fidelity"]["mean"] / tuned_best if tuned_best > 0 else None  # None: nothing learned
    keeps = _keeps(default, base)
    return {
        "subject_fidelity": default["subject_fidelity"]["mean"],
        "tuned_lr": best["lr"],
        "tuned": best["subject_fidelity"]["mean"],
        "share": share,
        "keeps_the_class": keeps,
        "meets": share is not None and share >= LR_FREE and keeps,
    }


def keeping_the_class(rows: list[dict], base: dict) -> float | None:
    """The learning rate of the highest mean subject fidelity among those whose prompt fidelity holds and whose
    plain class stays within DRIFT of the base model's (class accuracy and look rate): a preset's choice."""
    best = _best_keeping(rows, base)
    return None if best is None else best["lr"]


def robustness(rows: list[dict], score: str = "subject_fidelity", floor: float = 0.0) -> dict:
    """The learning rates around the best one (in grid order, without a gap) whose mean `score` is within
    NEAR_BEST of the best and whose prompt fidelity holds: how many, and how many decades they span. Within reach is
    measured above `floor`, the base model's score (subject closeness starts at about 0.1, subject fidelity at 0)."""
    ok = [r["prompt_fidelity"]["mean"] >= PROMPT_FLOOR for r in rows]
    if not any(ok):
        return {"best_lr": None, "best": None, "lrs": [], "decades": 0.0}
    i = max((j for j in range(len(rows)) if ok[j]), key=lambda j: rows[j][score]["mean"])
    best = rows[i][score]["mean"]

    def near(j: int) -> bool:
        return ok[j] and rows[j][score]["mean"] - floor >= NEAR_BEST * (best - floor)

    lo, hi = i, i
    while lo > 0 and near(lo - 1):
        lo -= 1
    while hi < len(rows) - 1 and near(hi + 1):
        hi += 1
    lrs = [rows[j]["lr"] for j in range(lo, hi + 1)]
    return {"best_lr": rows[i]["lr"], "best": best, "lrs": lrs, "decades": math.log10(lrs[-1] / lrs[0])}


def transfer_table(results: dict, plan: StudyPlan) -> dict:
    """Per init, per transfer factor setting: krona's rows (AdamW) over the transfer learning rates and the best lr
    by subject fidelity and by closeness (prompt fidelity held); and per init how many decades the best lr moves
    across the factor settings (0: it holds)."""
    runs = [r for r in results["runs"].values() if r["part"] in ("lr", "transfer") and variant(r) == "kron"]
    table = {}
    for init in plan.inits:
        per = {}
        for factors in plan.transfer:
            wanted = _init_of(factors, init)
            rows = _groups(
                [
                    r
                    for r in runs
                    if r["setting"] == factors and r.get("init", "normal") == wanted and r["lr"] in plan.transfer_lrs
                ]
            )
            rows.sort(key=lambda r: r["lr"])
            per[factors] = {
                "rows": rows,
                **{
                    f"best_lr{suffix}": robustness(rows, score)["best_lr"] if all(score in r for r in rows) else None
                    for suffix, score in (("", "subject_fidelity"), ("_closeness", CLOSENESS))
                },
            }
        table[init] = {"factors": per}
        for suffix in ("", "_closeness"):
            bests = [v[f"best_lr{suffix}"] for v in per.values()]
            known = None not in bests and bool(bests)
            table[init][f"moves{suffix}"] = math.log10(max(bests) / min(bests)) if known else None
    return table


def steps_curve(results: dict, best: dict[str, float]) -> dict[str, list[dict]]:
    """Per method, at its best learning rate: the validations' subject and prompt fidelity at each step, over seeds."""
    curves = {}
    for method, lr in best.items():
        runs = [r for r in results["runs"].values() if r["part"] == "lr" and variant(r) == method and r["lr"] == lr]
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
    pick = {  # AdamW's krona runs only: the other optimizers' runs share krona's setting and lr grid
        m: [r for r in results["runs"].values() if variant(r) == m and r["setting"] == plan.kron_setting]
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
    at_best = _groups(
        [
            r
            for r in results["runs"].values()
            if r["part"] in ("lr", "budget") and variant(r) == r["method"] != "lokr" and r["lr"] == best[r["method"]]
        ]
    )
    floor = (results.get("base") or {}).get(CLOSENESS)  # None: a base scored before closeness
    closeness = {
        m: robustness(rows, CLOSENESS, floor)
        for m, rows in table.items()
        if floor is not None and all(CLOSENESS in r for r in rows)
    }
    return {
        "best_lr": best,
        "lr": table,
        "robustness": {m: robustness(rows) for m, rows in table.items()},
        **({"robustness_closeness": closeness} if closeness else {}),
        **({"transfer": transfer_table(results, plan)} if plan.transfer else {}),
        **({"learning_rate_free": learning_rate_free(table, results["base"])} if "prodigy" in plan.optimizers else {}),
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
