"""The libraries' chatter stays out of krona's output: their environment set before any of them is imported, their
loggers quieted by hierarchy (a library's logger and all its children), their warnings ignored. `--debug` shows it."""

from __future__ import annotations

import logging
import os
import warnings

# Progress bars and telemetry stay off even with --debug; a user's own setting wins.
_ALWAYS = (
    ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
)
# Info and advisory logs, which transformers and diffusers configure from their environment at import.
_QUIET = (
    ("TRANSFORMERS_VERBOSITY", "error"),
    ("DIFFUSERS_VERBOSITY", "error"),
    ("HF_HUB_VERBOSITY", "error"),  # else "Could not reach the Hub" on every offline load of a cached hub id
    ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
)
# Every library krona loads, by the top of its logger hierarchy (`kernels._internals.hf_hub` is under `kernels`).
LIBRARIES = (
    "diffusers",
    "transformers",
    "huggingface_hub",
    "accelerate",
    "torch",
    "peft",
    "bitsandbytes",
    "kernels",
    "lycoris",
    "safetensors",
    "tokenizers",
)


def quiet_libraries(debug: bool) -> None:
    """Before any library is imported: its environment; then, unless `debug`, every logger of LIBRARIES at ERROR and
    their warnings (deprecations and advisories are for developers, not users) ignored."""
    for name, value in _ALWAYS + (() if debug else _QUIET):
        os.environ.setdefault(name, value)
    if debug:
        return
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.filterwarnings("ignore", module=rf"({'|'.join(LIBRARIES)})(\.|$)")


def no_loading_bars() -> None:
    """diffusers' and transformers' own loading bars would interleave with krona's output."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
