"""Validation while training (`--validate-every`): how far the run has gone, measured the same way at every
validation, and which step to keep.

- **Validation loss**, no extra model: the denoising loss of the adapted UNet on every instance photo at fixed
  (noise, timestep) pairs (TIMESTEPS timesteps spread over the schedule, noise drawn from the photo's own generator),
  and beside it the same loss on the first CLASS_ITEMS class images: that one rising shows prior drift.
- **Scores**, with `--scorer toy|clip`: subject fidelity and prompt fidelity of the sample grid drawn at that step,
  whose prompts put the subject in new contexts (`validation_prompts`) unless `--sample-prompt` is given.
- **The best step** (`choose`): among the steps whose prompt fidelity stays within `--best-margin` (a share) of the
  base model's, measured at step 0 before any training, the latest whose subject fidelity is within one standard
  error of their highest.

The history and the chosen step's adapter weights travel in checkpoints, so a resumed run ends with the same
`validation.json` and the same choice as an uninterrupted one.

Library code: raises KronaError, never prints.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import write_bytes_atomic
from ..errors import KronaError
from ..rng import generator

TIMESTEPS = 4  # fixed timesteps per image: the middles of four equal slices of the schedule
CLASS_ITEMS = 8  # class images in the class loss (the first ones)
#: Contexts of DreamBench's live-subject prompts, the default validation prompts of the CLIP scorer.
DREAMBENCH_CONTEXTS = (
    "in the jungle",
    "in the snow",
    "on the beach",
    "on a cobblestone street",
    "on top of pink fabric",
)
FILE = "validation.json"
PLOT = "validation.png"


def validation_prompts(prompt: str, scorer: str, captions: Sequence[str] = ()) -> list[str]:
    """The instance prompt in new contexts: for the toy scorer, on each of the world's background colours that no
    instance caption names; otherwise in DreamBench's contexts."""
    if scorer == "toy":
        from ..world.scenes import COLOURS, article

        named = " ".join(captions).lower().split()
        return [f"{prompt} on {article(c)} {c} background" for c in COLOURS if c not in named]
    return [f"{prompt} {context}" for context in DREAMBENCH_CONTEXTS]


@torch.no_grad()
def validation_loss(denoiser, encoder, objective, dataset, what: str, count: int, seed: int, snr_gamma, autocast, text):
    """The mean denoising loss of `denoiser` over the first `count` items of `dataset`, each at the objective's fixed
    timesteps with noise from its own generator, on the posterior mean of its latents. `text(captions)` gives their
    conditioning."""
    device = next(denoiser.parameters()).device
    family, dtype = encoder.family, encoder.weight_dtype
    losses = []
    for i in range(min(count, len(dataset))):
        mean, _, time_ids, captions = encoder.items(what, dataset, [i], dataset.bucket_of(i))
        t = objective.fixed_timesteps(TIMESTEPS, tuple(mean.shape[1:])).to(device)
        latents = encoder.scale(mean.to(device)).expand(TIMESTEPS, *mean.shape[1:])
        noise = torch.randn(latents.shape, generator=generator("validation", what, seed, i)).to(device)
        cond = text(captions * TIMESTEPS)
        geometry = torch.tensor(time_ids * TIMESTEPS, device=device, dtype=dtype)
        with autocast():
            noisy = objective.noisy(latents, noise, t)
            prediction = family.denoise(denoiser, noisy, objective.model_timesteps(t), cond, geometry, dtype)
            prediction = objective.output(prediction, noisy, t)
        target = objective.target(latents, noise, t)
        losses.append(objective.per_sample_loss(prediction, target, t, snr_gamma).mean())
    return float(torch.stack(losses).mean()) if losses else None


class Scorer:
    """Subject and prompt fidelity of pictures: the toy world's (no model), or DINO (subject: similarity to the
    instance photos) and CLIP-T (prompt, without the identifier), with CLIP-I beside them."""

    def __init__(self, kind: str, identifier: str, photos: Sequence[Path] = (), clip_model="", dino_model=""):
        self.kind, self.identifier = kind, identifier
        if kind == "clip":
            from ..images import load_image
            from ..scoring.metrics import Embedder

            self.clip, self.dino = Embedder.clip(clip_model), Embedder.dino(dino_model)
            reference = [load_image(p) for p in photos]
            self.reference = {"clip": self.clip.images(reference), "dino": self.dino.images(reference)}

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> dict[str, float | None]:
        """subject_fidelity with its standard error over the pictures (subject_fidelity_se), prompt_fidelity, and
        for clip also clip_i."""
        if self.kind == "toy":
            from ..world.scorers import parse, score

            toy = score(images, prompts, self.identifier)
            looks = [r["read_look"] for r in toy.per_image if parse(r["prompt"] or "", self.identifier).subject]
            return {
                "subject_fidelity": toy.subject_fidelity,
                "subject_fidelity_se": _standard_error(torch.tensor(looks, dtype=torch.float64)),
                "prompt_fidelity": toy.prompt_fidelity,
            }
        from ..scoring.metrics import score_embeddings

        gen = {"clip": self.clip.images(images), "dino": self.dino.images(images)}
        scores, rows = score_embeddings(gen, self.reference, prompts, self.identifier, self.clip)
        return {
            "subject_fidelity": scores["dino"],
            "subject_fidelity_se": _standard_error(torch.tensor([r["dino"] for r in rows], dtype=torch.float64)),
            "prompt_fidelity": scores["clip_t"],
            "clip_i": scores["clip_i"],
        }


def _standard_error(values: torch.Tensor) -> float | None:
    """The standard error of the mean of `values` (None for fewer than two)."""
    return float(values.std() / len(values) ** 0.5) if len(values) > 1 else None


@dataclass
class Choice:
    step: int
    why: str


def choose(points: Sequence[dict], margin: float) -> Choice | None:
    """The best step of a scored history (None before a second scored step). Of the steps after the first validation
    (step 0, the base model, unless validation began at a resume), those whose prompt fidelity is at least
    (1 − margin) × the first's are kept; of them, the latest whose subject fidelity is within one standard error (over
    its grid's pictures) of the highest: as good as a grid of pictures can tell, and trained longer (the
    one-standard-error rule). When no step keeps that prompt fidelity, the step with the highest prompt fidelity
    (the later on a tie)."""
    scored = [p for p in points if p.get("subject_fidelity") is not None and p.get("prompt_fidelity") is not None]
    if len(scored) < 2:
        return None
    start, trained = scored[0], scored[1:]
    floor = (1 - margin) * start["prompt_fidelity"]
    kept = [p for p in trained if p["prompt_fidelity"] >= floor]
    if kept:
        top = max(kept, key=lambda p: p["subject_fidelity"])
        bar = top["subject_fidelity"] - (top.get("subject_fidelity_se") or 0.0)
        best = [p for p in kept if p["subject_fidelity"] >= bar][-1]
        return Choice(
            best["step"],
            f"subject fidelity {best['subject_fidelity']:.3f}, within one standard error of the highest "
            f"({top['subject_fidelity']:.3f} at step {top['step']}, down to {bar:.3f}) of the steps whose prompt "
            f"fidelity stays at or above {floor:.3f} ({1 - margin:.0%} of the base model's "
            f"{start['prompt_fidelity']:.3f}), the latest such step; its prompt fidelity {best['prompt_fidelity']:.3f}",
        )
    best = max(trained, key=lambda p: (p["prompt_fidelity"], p["step"]))
    return Choice(
        best["step"],
        f"no step kept prompt fidelity at or above {floor:.3f} ({1 - margin:.0%} of the base model's "
        f"{start['prompt_fidelity']:.3f}); the highest prompt fidelity ({best['prompt_fidelity']:.3f})",
    )


@dataclass
class History:
    """The validations of a run so far and the chosen step's adapter weights (as they would be saved)."""

    margin: float
    points: list[dict] = field(default_factory=list)
    best: dict[str, torch.Tensor] | None = None  # the adapter weights of `choice().step`

    def add(self, point: dict, weights: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Record a validation of a step after every recorded one; when it is the new best step, keep `weights()`
        (the newest point either becomes the best or leaves the choice as it was: the rule prefers the latest step
        and compares prompt fidelity with the first validation's only)."""
        self.points.append(point)
        choice = self.choice()
        if choice is not None and choice.step == point["step"]:
            self.best = {k: v.detach().to("cpu", copy=True) for k, v in weights().items()}

    def choice(self) -> Choice | None:
        return choose(self.points, self.margin)

    def state(self) -> dict:
        return {"points": self.points, "best": self.best}

    def restore(self, state: dict) -> None:
        self.points, self.best = list(state["points"]), state.get("best")

    def write(self, out: Path, scorer: str) -> Path:
        """`validation.json`: the rule, every validation, and the chosen step."""
        choice = self.choice()
        record = {
            "scorer": scorer,
            "rule": "of the steps whose prompt fidelity >= (1 - margin) x the first validation's (step 0), the latest "
            "whose subject fidelity >= their highest minus its standard error",
            "margin": self.margin,
            "timesteps": TIMESTEPS,
            "class_items": CLASS_ITEMS,
            "best": None if choice is None else {"step": choice.step, "why": choice.why},
            "steps": self.points,
        }
        return write_bytes_atomic(out / FILE, json.dumps(record, indent=1).encode())


def plot(history: History, out: Path) -> Path:
    """`validation.png`: the scores and losses against steps with the chosen step marked, and the sample grids of
    the chosen and the last step side by side."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    points, choice = history.points, history.choice()
    grids = []
    for label, point in (("chosen", _point(points, choice.step if choice else None)), ("last", points[-1])):
        if point is not None and point.get("grid") and (out / point["grid"]).is_file():
            grids.append((f"{label}: step {point['step']}", out / point["grid"]))
    if len(grids) == 2 and grids[0][1] == grids[1][1]:
        grids = [(f"chosen and last: step {points[-1]['step']}", grids[1][1])]
    figure = plt.figure(figsize=(10, 8 if grids else 4), dpi=100)
    rows = 2 if grids else 1
    steps = [p["step"] for p in points]
    panels = [("validation loss", ("instance_loss", "class_loss")), ("scores", ("subject_fidelity", "prompt_fidelity"))]
    if not any(p.get("subject_fidelity") is not None for p in points):  # no scorer: no scores and no best step
        panels = [("validation loss (no --scorer: no scores, no best step)", panels[0][1])]
    for i, (title, keys) in enumerate(panels):
        axes = figure.add_subplot(rows, len(panels), i + 1)
        for key in keys:
            values = [(s, p[key]) for s, p in zip(steps, points) if p.get(key) is not None]
            if values:
                axes.plot(*zip(*values), marker="o", label=key.replace("_", " "))
        axes.set(xlabel="step", title=title)
        if axes.lines:
            axes.legend()
        if choice is not None:
            axes.axvline(choice.step, color="grey", linestyle="--")
    for i, (label, path) in enumerate(grids):
        axes = figure.add_subplot(rows, len(grids), len(grids) + i + 1)
        with Image.open(path) as image:
            axes.imshow(image.convert("RGB"))
        axes.set_title(label)
        axes.axis("off")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return write_bytes_atomic(out / PLOT, buffer.getvalue())


def _point(points: Sequence[dict], step: int | None) -> dict | None:
    return next((p for p in points if p["step"] == step), None)


def check_settings(scorer: str, validating: bool, keep: str, identifier: str, prompt: str | None) -> None:
    """KronaError for validation settings that cannot work together (each value is checked by the config)."""
    if scorer != "none" and not validating:
        raise KronaError(
            f"--scorer {scorer} scores validations, but --validate-every 0 turns them off; pass --scorer none to "
            "train without validation, or a --validate-every above 0"
        )
    if keep == "best" and scorer == "none":
        raise KronaError(
            "--keep best needs --scorer (toy or clip): the best step is chosen by the sample grid's scores"
        )
    if scorer != "none" and prompt and identifier.lower() not in prompt.lower().split():
        raise KronaError(
            f"--identifier '{identifier}' is not a word of --prompt '{prompt}'; the scorer needs the subject's "
            "identifier word: pass --identifier WORD"
        )
