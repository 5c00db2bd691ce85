"""Resumable training checkpoints: one folder per step, written atomically, safetensors and JSON only (no pickle).

    <output_dir>/checkpoints/step-000123/
        params.safetensors      trainable tensors ("params.<name>")
        optimizer.safetensors   the optimizer's and lr scheduler's tensors ("optimizer.state.0.exp_avg", ...)
        ema.safetensors         EMA shadow tensors (only when the run keeps an EMA)
        rng.safetensors         torch CPU / CUDA generator states (only when captured)
        validation.safetensors  the validation history and the best step's weights (only with --validate-every)
        state.json              format, version, step, meta, and under "files" each file's structure (`pack_tree`):
                                dicts, lists, numbers, strings, with `{"__tensor__": key}` where a tensor was

A folder counts as a checkpoint once it is named `step-N` and holds `state.json`; write_folder_atomic makes the
whole folder appear at once, so a killed run leaves at most a hidden `.step-N.tmp-…` leftover.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import uuid
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..atomic import fsync_dir, write_bytes_atomic, write_folder_atomic
from ..errors import KronaError
from ..paths import expand

CHECKPOINTS = "checkpoints"
FORMAT = "krona-checkpoint"
VERSION = 1
STATE_FILE = "state.json"
_STEP_RE = re.compile(r"step-(\d+)")
_TAGS = ("__tensor__", "__tuple__", "__dict__")


@dataclass
class TrainingState:
    """Everything a run needs to continue exactly: tensors anywhere (saved as CPU copies), the rest JSON-able."""

    step: int  # optimizer steps done
    params: dict[str, torch.Tensor]  # trainable tensors by name
    optimizer: dict  # optimizer.state_dict() (torch or bitsandbytes)
    lr_scheduler: dict  # lr_scheduler.state_dict()
    ema: dict[str, torch.Tensor] | None = None  # EMA.state_dict()
    rng: dict | None = None  # capture_rng()
    meta: dict = field(default_factory=dict)  # JSON-able run info (config, its hash, data files...)
    validation: dict | None = None  # validation.History.state(): the validations so far, the best step's weights


def checkpoint_dir(output_dir, step: int) -> Path:
    """`output_dir/checkpoints/step-000123` (six digits, more when the step needs them)."""
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    # A copy of its own: safetensors refuses tensors that share memory (bitsandbytes shares its qmaps between params).
    return t.detach().to("cpu", copy=True).contiguous()


def pack_tree(obj, prefix: str = "") -> tuple[object, dict[str, torch.Tensor]]:
    """Split a nested structure into a JSON-able tree and its tensors (CPU copies, keyed by their path in `obj`).

    Dicts whose keys are not all strings (or that look like a tag), tuples and tensors become one-key tagged objects
    (`__dict__` with [key, value] pairs, `__tuple__`, `__tensor__`), so `unpack_tree` rebuilds `obj` exactly.
    """
    tensors: dict[str, torch.Tensor] = {}

    def pack(x, path: str):
        if isinstance(x, torch.Tensor):
            while path in tensors:
                path += "#"
            tensors[path] = _cpu_copy(x)
            return {"__tensor__": path}
        if isinstance(x, tuple):
            return {"__tuple__": [pack(v, _join(path, i)) for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [pack(v, _join(path, i)) for i, v in enumerate(x)]
        if isinstance(x, dict):
            items = [(k, pack(v, _join(path, k))) for k, v in x.items()]
            if all(isinstance(k, str) for k in x) and not (len(x) == 1 and next(iter(x)) in _TAGS):
                return dict(items)
            return {"__dict__": [[pack(k, _join(path, "key")), v] for k, v in items]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} (at '{path}') in a checkpoint")

    return pack(obj, prefix), tensors


def unpack_tree(tree, tensors: dict[str, torch.Tensor]):
    """The structure `pack_tree` split into `tree` and `tensors`."""
    if isinstance(tree, list):
        return [unpack_tree(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if len(tree) == 1:
            ((tag, value),) = tree.items()
            if tag == "__tensor__":
                return tensors[value]
            if tag == "__tuple__":
                return tuple(unpack_tree(v, tensors) for v in value)
            if tag == "__dict__":
                return {unpack_tree(k, tensors): unpack_tree(v, tensors) for k, v in value}
        return {k: unpack_tree(v, tensors) for k, v in tree.items()}
    return tree


def capture_rng(devices: Iterable[int] | None = None) -> dict:
    """The global random states: Python `random`, numpy, torch CPU and the CUDA `devices` (None: every visible one).

    The Mersenne Twister key arrays are int64 tensors, so they land in rng.safetensors rather than in state.json.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {
        "python": (version, torch.tensor(internal, dtype=torch.int64), gauss_next),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        indices = range(torch.cuda.device_count()) if devices is None else devices
        rng["cuda"] = {i: torch.cuda.get_rng_state(i) for i in indices}
    return rng


def restore_rng(rng: dict) -> None:
    """Set the global random states from `capture_rng`'s dict (CUDA states only for devices this machine has)."""
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal.tolist()), gauss_next))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i, state in rng.get("cuda", {}).items():
        if i < count:
            torch.cuda.set_rng_state(state, i)


def save_checkpoint(output_dir, state: TrainingState, keep: int | None = None) -> Path:
    """Write `checkpoints/step-N` whole or not at all, then delete all but the newest `keep` (None or 0: keep all)."""
    if keep is not None and keep < 0:
        raise KronaError(f"cannot keep {keep} checkpoints; use a positive number, or 0 to keep them all")
    groups = {
        "params.safetensors": {"params": state.params},
        "optimizer.safetensors": {"optimizer": state.optimizer, "lr_scheduler": state.lr_scheduler},
        "ema.safetensors": {"ema": state.ema},
        "rng.safetensors": {"rng": state.rng},
        "validation.safetensors": {"validation": state.validation},
    }
    packed = {file: pack_tree(group) for file, group in groups.items() if None not in group.values()}
    trees = {file: tree for file, (tree, _) in packed.items()}
    info = {"format": FORMAT, "version": VERSION, "step": state.step, "meta": state.meta, "files": trees}
    info_bytes = json.dumps(info, indent=1).encode()  # here, before any writing, meta that is not JSON-able fails

    def fill(folder: Path) -> None:
        for file, (_, tensors) in packed.items():
            write_bytes_atomic(folder / file, save_tensors(tensors))
        write_bytes_atomic(folder / STATE_FILE, info_bytes)

    path = write_folder_atomic(checkpoint_dir(output_dir, state.step), fill)
    if keep:
        for old in [c for c in list_checkpoints(output_dir)[:-keep] if c.name != path.name]:
            # Renamed first: a run killed while deleting leaves a leftover, never a partial `step-N` that looks whole.
            doomed = old.with_name(f".{old.name}.old-{uuid.uuid4().hex}")
            old.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        fsync_dir(path.parent)
    return path


def _step(folder: Path) -> int | None:
    match = _STEP_RE.fullmatch(folder.name)
    return int(match[1]) if match and (folder / STATE_FILE).is_file() else None


def list_checkpoints(output_dir) -> list[Path]:
    """The complete checkpoints under `output_dir/checkpoints`, oldest to newest by step."""
    folder = Path(output_dir) / CHECKPOINTS
    found = [p for p in folder.iterdir() if _step(p) is not None] if folder.is_dir() else []
    return sorted(found, key=_step)


def incomplete_leftovers(output_dir) -> list[Path]:
    """Temporary or partial checkpoint folders in `output_dir/checkpoints` (a killed run's; safe to delete)."""
    folder = Path(output_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.lstrip(".").startswith("step-") and _step(p) is None)


def resolve_resume(output_dir, resume: str) -> Path | None:
    """`latest`: the newest complete checkpoint (None when there is none); otherwise the checkpoint folder `resume`."""
    if resume == "latest":
        return (list_checkpoints(output_dir) or [None])[-1]
    path = expand(resume)
    if not (path.is_dir() and (path / STATE_FILE).is_file()):
        raise KronaError(
            f"--resume {resume} is not a complete checkpoint folder (one with {STATE_FILE}); pass 'latest' or a folder "
            f"such as {checkpoint_dir(output_dir, 500)}"
        )
    return path


@contextmanager
def _reading(file: Path):
    try:
        yield
    except FileNotFoundError as e:
        raise KronaError(f"checkpoint file {file} is missing; resume from another checkpoint or start over") from e
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        raise KronaError(
            f"checkpoint file {file} is corrupt ({e}); resume from another checkpoint or start over"
        ) from e


def load_checkpoint(path) -> TrainingState:
    """Read a checkpoint folder written by `save_checkpoint` (tensors on the CPU, in their saved order)."""
    path = Path(path)
    file = path / STATE_FILE
    with _reading(file):
        info = json.loads(file.read_text())
        if info.get("format") != FORMAT or not isinstance(info.get("version"), int):
            raise ValueError(f"not a {FORMAT} state file")
    if info["version"] > VERSION:
        raise KronaError(
            f"checkpoint file {file} has format version {info['version']}, newer than this krona reads ({VERSION}); "
            "upgrade krona to resume from it"
        )
    values = {}
    with _reading(file):
        files = dict(info["files"])
    for name, tree in files.items():
        with _reading(path / name):  # also names the file when state.json refers to a tensor it lacks
            values.update(unpack_tree(tree, load_tensors((path / name).read_bytes())))
    with _reading(file):
        return TrainingState(step=info["step"], meta=info["meta"], **values)
