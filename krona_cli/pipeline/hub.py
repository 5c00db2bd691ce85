"""Models named by the user: a local path or a hub id, told apart by what exists, never by spelling; and the Hugging
Face hub, asked once. Where the hub cannot be reached, this process switches huggingface_hub to offline mode, so every
library reads the local cache at once instead of retrying each file with back-off (tens of seconds), and a model that
is not cached fails in one line. Light on purpose (no torch): the CLI checks model names here before loading anything.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from ..errors import KronaError
from ..paths import expand

PROBE_TIMEOUT_S = 3.0
_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
BASE_MODELS = (
    "a diffusers folder, a single-file .safetensors checkpoint or a hub id such as "
    "stabilityai/stable-diffusion-xl-base-1.0"
)


def locate(name: str, flag: str = "--pretrained-model", expected: str = BASE_MODELS) -> tuple[str, Path | str]:
    """Where a model named on the command line is: ("folder", path), ("file", path) or ("hub", repo id).

    An existing folder or file is local (a hub id such as `stabilityai/stable-diffusion-xl-base-1.0` is one only where
    no such path exists); a name that is neither is a KronaError naming `flag` and what it `expected`."""
    path = expand(name)
    if name.strip() and path.is_dir():
        return "folder", path.absolute()
    if name.strip() and path.is_file():
        return "file", path.absolute()
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
        is_repo_id = name.count("/") == 1 and not name.startswith((".", "~")) and not name.endswith(_FILE_SUFFIXES)
    except HFValidationError:
        is_repo_id = False
    if not is_repo_id:
        raise KronaError(f"{flag} '{name}' does not exist; give {expected}")
    return "hub", name


def absolute(name: str | None) -> str | None:
    """A model or file named by the user as it is saved in files: absolute where it exists locally, else as given
    (a hub id), so that it still works from another folder."""
    if name is None:
        return None
    path = expand(name)
    return str(path.absolute()) if path.exists() else name


@functools.cache
def reachable() -> bool:
    """Whether the hub's host accepts a connection within a few seconds (asked once per process). The name lookup
    and the connection run in a thread that is given up after PROBE_TIMEOUT_S: a resolver that hangs is no answer."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    answer: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S):
                answer.append(True)
        except OSError:
            answer.append(False)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(PROBE_TIMEOUT_S)
    return bool(answer and answer[0])


def offline() -> str | None:
    """Why the hub is off for this process (HF_HUB_OFFLINE=1, or it cannot be reached: then offline mode is turned on
    for the libraries too), or None when it is on."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "the hub is switched off (HF_HUB_OFFLINE=1)"
    if reachable():
        return None
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    return "the hub cannot be reached"


def model_source(name: str, flag: str, what: str) -> str:
    """The folder (`~` expanded) or hub id to load a transformers model from; KronaError naming `flag` for a file, a
    name that is neither a folder nor a hub id, or a hub id that is not cached while the hub is off."""
    try:
        kind, where = locate(str(name), flag, "the model's folder or a hub id")
    except KronaError as e:
        raise model_error(name, flag, what, str(e).partition("; ")[0]) from e
    if kind == "file":
        raise model_error(name, flag, what, "it is a file; give the model's folder (config.json and weights)")
    if kind == "folder":
        return str(where)
    why = offline()  # asked once: an unreachable hub then fails at once from the cache instead of retrying
    if why and not _cached(where):
        raise model_error(
            name,
            flag,
            what,
            f"not in the local Hugging Face cache, and {why}; download it once with `hf download {where}`",
        )
    return where


def _cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


def model_error(name: str, flag: str, what: str, detail: str) -> KronaError:
    if len(detail) > 240:
        detail = detail[:237] + "..."
    return KronaError(
        f"cannot load the {what} model '{name}' ({detail}); pass {flag} with a local folder or a hub id while online"
    )
