"""The report of `krona compare --study` (study.py): report.md and its plots (lr.png, pareto.png, steps.png), from
results.json's summary alone."""

from __future__ import annotations

from pathlib import Path

from ..atomic import write_bytes_atomic
from .study import CLOSENESS, DRIFT, LR_FREE, NEAR_BEST, PROMPT_FLOOR, SCORES

_LR_MEANING = {"kron prodigy": " (lr: × its own step)"}


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
        *_lr_lines(s),
    ]
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
    if s.get("transfer"):
        lines += _transfer_lines(s["transfer"], plan)
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


def _lr_lines(s: dict) -> list[str]:
    """The lr sweep's table and robust ranges (by subject closeness too, where the study has it)."""
    scores = (*SCORES, CLOSENESS) if "robustness_closeness" in s else SCORES  # studies before closeness lack it
    lines = [_header("method", "lr", *(k.replace("_", " ") for k in scores))]
    for method, rows in s["lr"].items():
        lines += [f"| {method} | {r['lr']:g} | " + " | ".join(_cell(r[k]) for k in scores) + " |" for r in rows]
    lines += [
        "",
        f"Robust range: the learning rates next to the best whose subject fidelity is within {NEAR_BEST:.0%} of the "
        f"best with prompt fidelity ≥ {PROMPT_FLOOR:.0%}.",
        "",
        *_robust_rows(s["robustness"], "subject fidelity"),
    ]
    if "robustness_closeness" in s:
        lines += [
            "",
            f"By subject closeness instead (within {NEAR_BEST:.0%} of the best's gain over the base model's "
            f"{s['base'][CLOSENESS]:.3f}):",
            "",
            *_robust_rows(s["robustness_closeness"], "subject closeness"),
        ]
    free = s.get("learning_rate_free")
    if free:
        verdict = "meets" if free["meets"] else "does not meet"
        share = "none" if free["share"] is None else f"{free['share']:.0%}"
        lines += [
            "",
            f"Prodigy at its default (lr 1): subject fidelity {free['subject_fidelity']:.3f}, {share} of "
            f"krona's best tuned AdamW run ({free['tuned']:.3f} at lr {free['tuned_lr']:g}); the plain class "
            f"{'kept' if free['keeps_the_class'] else 'not kept'} within {DRIFT:g}: it {verdict} the bar for a "
            f"learning-rate-free default ({LR_FREE:.0%}, class kept).",
        ]
    return lines


def _header(*columns: str) -> str:
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def _robust_rows(robust: dict, score: str) -> list[str]:
    lines = [_header("method", "best lr", f"best {score}", "robust range", "decades")]
    for method, r in robust.items():
        if r["best_lr"] is None:
            lines.append(f"| {method} | none with prompt fidelity ≥ {PROMPT_FLOOR:.0%} | | | 0 |")
            continue
        span = f"{r['lrs'][0]:g} – {r['lrs'][-1]:g}" if len(r["lrs"]) > 1 else f"{r['lrs'][0]:g} alone"
        lines.append(f"| {method} | {r['best_lr']:g} | {r['best']:.3f} | {span} | {r['decades']:.2f} |")
    return lines


def _transfer_lines(transfer: dict, plan: dict) -> list[str]:
    """The report's section on whether the best lr holds across factors, per init."""
    scores = ("subject_fidelity", CLOSENESS, "prompt_fidelity", "class_accuracy")
    lines = [
        "## Does the best learning rate hold across factors?",
        "",
        f"krona (AdamW) at factors {', '.join(plan['transfer'])}, each at lr "
        f"{', '.join(f'{lr:g}' for lr in plan['transfer_lrs'])}, with A drawn by each `--kron-init`.",
        "",
        _header("init", "factors", "lr", *(k.replace("_", " ") for k in scores)),
    ]
    for init, part in transfer.items():
        for factors, entry in part["factors"].items():
            lines += [
                f"| {init} | {factors} | {r['lr']:g} | "
                + " | ".join(_cell(r[k]) if k in r else "" for k in scores)
                + " |"
                for r in entry["rows"]
            ]
    lines += ["", _header("init", "best lr by factors (subject fidelity)", "moves (decades)", "by closeness", "moves")]
    for init, part in transfer.items():
        cells = []
        for suffix in ("", "_closeness"):
            best = (v[f"best_lr{suffix}"] for v in part["factors"].values())
            cells.append(", ".join(f"{f} {'none' if b is None else f'{b:g}'}" for f, b in zip(part["factors"], best)))
            moves = part[f"moves{suffix}"]
            cells.append("" if moves is None else f"{moves:.2f}")
        lines.append(f"| {init} | " + " | ".join(cells) + " |")
    return [*lines, ""]


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
            # Prodigy's lr multiplies the step size it estimates: the same axis, another meaning
            band(axis, [r["lr"] for r in rows], [r[key] for r in rows], method + _LR_MEANING.get(method, ""))
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
