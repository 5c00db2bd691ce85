"""Which layers an adapter targets: the presets and regular expressions over full module names (diffusers and
transformers naming). No torch: `krona plan` selects from the layer lists with them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ..errors import KronaError

# Regular expressions searched in full module names (diffusers / transformers naming): the UNet families' presets and
# the CLIP text encoders'. Other denoisers' families bring their own (families/*.py `target_presets`).
_UNET_ATTN = r"\.(to_q|to_k|to_v|to_out\.0)$"
_UNET_FF = r"\.ff\.net\.(0\.proj|2)$"
_TEXT_ATTN = r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$"

TARGET_PRESETS: dict[str, str] = {
    "attn": _UNET_ATTN,
    "attn-ff": f"(?:{_UNET_ATTN})|(?:{_UNET_FF})",
    "text": _TEXT_ATTN,
}


def target_pattern(targets: str | Iterable[str], presets: Mapping[str, str] = TARGET_PRESETS) -> re.Pattern:
    """Compile a preset name (of `presets`), a regular expression, or a list of either into one pattern over module
    names."""
    items = [targets] if isinstance(targets, str) else list(targets)
    if not items:
        raise KronaError("no adapter targets given; use a preset (attn, attn-ff, text) or a regular expression")
    parts = []
    for item in items:
        expr = presets.get(item, item)
        try:
            re.compile(expr)
        except (re.error, OverflowError, RecursionError) as e:
            raise KronaError(
                f"targets '{item}' is neither a preset ({', '.join(presets)}) nor a valid regular expression: {e}"
            ) from e
        parts.append(f"(?:{expr})")
    return re.compile("|".join(parts))
