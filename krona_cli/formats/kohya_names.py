"""kohya's layer names, shared by LoKr and LoRA files: a prefix per model (`lora_unet_`, `lora_te1_` / `lora_te2_` for
SDXL's text_encoder / text_encoder_2, `lora_te_` for the one text encoder of SD 1.x/2.x) followed by the module path
with `.` replaced by `_`, then `.` and the tensor's suffix (`lora_unet_down_blocks_1_..._to_q.lokr_w1`).

krona writes diffusers' UNet module paths and transformers 4's text-encoder paths (`text_model.encoder.layers.0.
self_attn.q_proj`): ComfyUI maps these names directly, A1111/Forge translate the UNet ones to the original layout
themselves, and diffusers and LyCORIS read them too.

krona reads those, and the SGM (original Stability) UNet names that kohya's sd-scripts writes for SDXL
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `lora_unet_middle_block_1_...`,
`lora_unet_output_blocks_...`, resnet linears `..._emb_layers_1`, `lora_unet_time_embed_0`,
`lora_unet_label_emb_0_0`); their text-encoder names are the same as above. The SGM numbering depends on the UNet's
block structure, so such names are mapped to diffusers paths with a UNet config (unet_paths.py): the caller's,
else SD 1.x's for a file that says it is for SD 1.x/2.x (kohya's `ss_base_model_version`, or the one-text-encoder
prefix `lora_te_`), else the real SDXL UNet's. A file names its UNet layers one way or the other, never both.

Module paths are decoded from the underscore names without a model: see `decode_path`. FLUX.1's transformer names
(`lycoris_`, `lora_transformer_`, and kohya's `lora_unet_` + Black Forest Labs' module names) are read here too, by
flux_names.py's rules. `KohyaNaming` is how krona's own LoKr and LoRA files name an SD 1.x/2.x or SDXL adapter's
layers (naming.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

from .. import families
from ..architectures import load_model_config
from ..errors import KronaError
from . import flux_names
from .native_outline import COMPONENTS, canonical_name
from .outline import Adapter
from .unet_paths import unet_path_from_sgm

UNET_PREFIX = "lora_unet_"
# The one text encoder's prefix of SD 1.x/2.x (each family's prefixes are its components' `kohya_prefix`).
TE_PREFIX_SINGLE = "lora_te_"
# kohya's lora-name prefixes (LoKr and LoRA files alike), longest first, so that `lora_te1_` is not read as
# `lora_te_` + `1...`.
KOHYA_PREFIXES = (
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
    (UNET_PREFIX, "unet"),
    (flux_names.ONETRAINER_PREFIX, flux_names.TRANSFORMER),
    (flux_names.LYCORIS_PREFIX, flux_names.TRANSFORMER),
)

# The key naming of a file, as `Adapter.key_format` records it.
KEY_FORMAT_DIFFUSERS_NAMES = "kohya"
KEY_FORMAT_SGM_NAMES = "kohya-sgm"

# kohya's own SDXL UNet (from the original Stability checkpoint) names its modules the SGM way.
_SGM_UNET = re.compile(r"^(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_")
# The UNet configs SGM names are read with when the caller gives none.
_SGM_CONFIG_SDXL = "sdxl_unet.json"
_SGM_CONFIG_SD1 = "sd15_unet.json"  # SD 2.x's UNet has the same block structure, so the same numbering


# --- module path <-> underscore name ------------------------------------------------------------------------------

# Every module-path segment of diffusers' UNet2DConditionModel (SD 1.x/2.x/SDXL configs) and transformers' CLIP text
# models that is not a number. Some contain `_` themselves, which is why names need a vocabulary to be decoded.
VOCABULARY = frozenset(
    {
        # UNet2DConditionModel
        "conv_in", "conv_out", "conv_norm_out", "conv_act",
        "time_proj", "time_embedding", "add_time_proj", "add_embedding", "linear_1", "linear_2", "act",
        "down_blocks", "mid_block", "up_blocks", "attentions", "resnets", "downsamplers", "upsamplers",
        "norm", "norm1", "norm2", "norm3", "conv", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
        "nonlinearity", "dropout", "proj_in", "proj_out", "transformer_blocks",
        "attn1", "attn2", "to_q", "to_k", "to_v", "to_out", "ff", "net", "proj",
        # CLIPTextModel / CLIPTextModelWithProjection
        "text_model", "embeddings", "token_embedding", "position_embedding", "encoder", "layers",
        "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2", "mlp",
        "fc1", "fc2", "activation_fn", "final_layer_norm", "text_projection",
    }
)  # fmt: skip
# The SGM UNet's own segments (its attention blocks keep diffusers' inner names). Used only for names that start the
# SGM way, so that they never change how a diffusers name is read.
SGM_VOCABULARY = VOCABULARY | {
    "input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb",
    "in_layers", "emb_layers", "out_layers", "skip_connection", "op", "out",
}  # fmt: skip


@lru_cache(maxsize=2)
def _words_by_length(sgm: bool) -> tuple[tuple[str, ...], ...]:
    """A vocabulary as part tuples, longest first: a greedy match then prefers `proj_in` to `proj`."""
    words = SGM_VOCABULARY if sgm else VOCABULARY
    return tuple(sorted((tuple(w.split("_")) for w in words), key=lambda p: (-len(p), p)))


def encode_path(path: str) -> str:
    """A module path as it appears in a lora name: `down_blocks.1.attn1.to_q` -> `down_blocks_1_attn1_to_q`."""
    return path.replace(".", "_")


def decode_path(name: str, key: str | None = None, sgm: bool = False) -> str:
    """The module path whose `encode_path` is `name`, found with the segment vocabulary and numbers alone
    (with `sgm`, the SGM UNet's segments too: `input_blocks_4_1_proj_in` -> `input_blocks.4.1.proj_in`).

    The name is split at `_` and rebuilt segment by segment, trying the longest vocabulary word first and going back
    when the rest cannot be read (a depth-first search, so the result is deterministic). KronaError, naming `key`,
    when no reading exists.
    """
    parts = name.split("_")
    words = _words_by_length(sgm)

    @cache
    def read(i: int) -> tuple[str, ...] | None:
        if i == len(parts):
            return ()
        if parts[i].isdigit():
            rest = read(i + 1)
            return None if rest is None else (parts[i], *rest)
        for word in words:
            if tuple(parts[i : i + len(word)]) == word:
                rest = read(i + len(word))
                if rest is not None:
                    return ("_".join(word), *rest)
        return None

    segments = read(0) if all(parts) else None
    if not segments:
        raise KronaError(
            f"cannot read the module path of key '{key or name}': '{name}' is not made of diffusers or SGM UNet / "
            "CLIP text encoder module names; krona reads LoKr and LoRA files for the SDXL and SD 1.x UNet and text "
            "encoders"
        )
    return ".".join(segments)


# --- prefixes -----------------------------------------------------------------------------------------------------


def adapter_prefixes(adapter: Adapter) -> dict[str, str]:
    """The kohya prefix of each component of an adapter (text encoders are numbered only where a model has two): its
    family's, where that prefixes every component the adapter holds that any family's does; else those of the family
    that does with the fewest text encoders (SD 1.x's `lora_te_`, not SDXL's `lora_te1_`/`lora_te2_`)."""
    named = {c.name for f in families.FAMILIES for c in f.components if c.kohya_prefix}
    held = named & set(adapter.layers)
    fits = [f for f in families.FAMILIES if held <= f.kohya_prefixes().keys()]
    fits.sort(key=lambda f: (f.name != adapter.architecture, len(f.text_encoders)))  # its own first
    return fits[0].kohya_prefixes() if fits else {}


def component_prefix(component: str, prefixes: Mapping[str, str]) -> str:
    """The lora-name prefix of a component among an adapter's `prefixes` (`adapter_prefixes`)."""
    if component not in prefixes:
        raise KronaError(f"the adapter holds an unknown component '{component}'; the adapter is damaged")
    return prefixes[component]


def lora_name(component: str, module: str, prefixes: Mapping[str, str]) -> str:
    """The lora name krona writes for a module (canonical spelling): `lora_te1_text_model_encoder_layers_0_...`."""
    if component not in COMPONENTS:
        raise KronaError(f"the adapter holds an unknown component '{component}'; the adapter is damaged")
    return component_prefix(component, prefixes) + encode_path(canonical_name(component, module))


# The alpha krona's LoKr files give every layer (both factors are stored full, so ComfyUI and A1111 ignore alpha,
# scale 1.0, and LyCORIS itself does too: `LokrModule` forces alpha = lora_dim when w1 and w2 are both full, so its
# scale is 1, and `make_module_from_state_dict` infers lora_dim = 1 for such a module, so 1 is exactly the alpha
# buffer LyCORIS would save for it (alpha·lora_dim/r_factor = 1). Its functional form
# (`functional.lokr.diff_weight(gamma=alpha)`) divides alpha by itself when nothing is decomposed, which is 1 for any
# alpha but 0 (0/0). A reader that naively divides alpha by a rank of 1 also gets 1.
LOKR_ALPHA = 1.0


@dataclass(frozen=True)
class KohyaNaming:
    """SD 1.x/2.x and SDXL names in krona's files (naming.py): kohya's lora names over diffusers' module paths for LoKr
    and the `kohya` LoRA layout (the default), diffusers' `<component>.<module>` for the `peft` LoRA layout.
    `prefixes`: each component's kohya prefix (`adapter_prefixes`: SDXL's two text encoders are `lora_te1_` and
    `lora_te2_`, SD 1.x/2.x's one `lora_te_`)."""

    prefixes: Mapping[str, str]
    lora_layouts: tuple[str, ...] = ("kohya", "peft")

    @classmethod
    def of(cls, adapter: Adapter) -> KohyaNaming:
        return cls(adapter_prefixes(adapter))

    def lokr_name(self, component: str, module: str) -> str:
        return lora_name(component, module, self.prefixes)

    def lokr_alpha(self, w1_shape: tuple[int, ...], w2_shape: tuple[int, ...]) -> float | None:
        return LOKR_ALPHA

    def lora_layers(
        self, written: list[tuple[str, str, np.ndarray, np.ndarray]], layout: str
    ) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(lora name, up, down) per layer (component, module, up, down) under `layout`'s names."""
        if layout == "kohya":
            return [(lora_name(c, m, self.prefixes), up, down) for c, m, up, down in written]
        return [(f"{c}.{canonical_name(c, m)}", up, down) for c, m, up, down in written]


def kohya_prefix(name: str) -> tuple[str, str] | None:
    """(prefix, component) of a kohya lora name or key (`lora_te1_...` -> ("lora_te1_", "text_encoder")), or None."""
    return next(((p, c) for p, c in KOHYA_PREFIXES if name.startswith(p)), None)


def check_text_prefixes(prefixes: set[str], source: str) -> None:
    """A file uses either one text encoder's prefix (`lora_te_`) or SDXL's two (`lora_te1_`/`lora_te2_`), not both."""
    if "lora_te_" in prefixes and prefixes & {"lora_te1_", "lora_te2_"}:
        raise KronaError(
            f"'{source}' mixes lora_te_ (one text encoder) with lora_te1_/lora_te2_ (SDXL's two) keys; "
            "the file is damaged"
        )


# --- reading a file's names ---------------------------------------------------------------------------------------


def _says_sd1(keys: Iterable[str], metadata: Mapping[str, str]) -> bool:
    """Whether a file says it is for SD 1.x/2.x: kohya's base model version, else one text encoder's prefix."""
    version = metadata.get("ss_base_model_version")
    if version:
        return str(version).startswith(("sd_v1", "sd_v2"))
    return any(k.startswith(TE_PREFIX_SINGLE) for k in keys)


class NameReader:
    """Reads the lora names of one file (`module`), diffusers- or SGM-named, and remembers which naming it used
    (`key_format`) and which prefixes (`prefixes`).

    `unet_config` is the config of the UNet SGM names are numbered for (see the module docstring for the default).
    """

    def __init__(
        self,
        keys: Iterable[str],
        metadata: Mapping[str, str],
        source: str,
        unet_config: Mapping | None = None,
        kind: str = "LoKr",
    ):
        self.source, self.kind = source, kind
        self.prefixes: set[str] = set()
        self._keys = list(keys)
        self._metadata = metadata
        self._given_config = unet_config
        self._config: Mapping | None = None
        self._config_name = "given"
        self._namings: dict[bool, str] = {}  # SGM-named? -> first such key
        self._flux: set[str] = set()  # the key formats of its FLUX.1 transformer names

    def _unet_config(self) -> Mapping:
        if self._config is None:
            if self._given_config is not None:
                self._config = self._given_config
            else:
                sd1 = _says_sd1(self._keys, self._metadata)
                self._config = load_model_config(_SGM_CONFIG_SD1 if sd1 else _SGM_CONFIG_SDXL)
                self._config_name = "SD 1.x" if sd1 else "SDXL"
        return self._config

    @property
    def key_format(self) -> str:
        if self._flux:
            return "+".join(sorted(self._flux))
        return KEY_FORMAT_SGM_NAMES if self._namings.get(True) else KEY_FORMAT_DIFFUSERS_NAMES

    def _transformer(self, prefix: str, component: str, rest: str, key: str) -> str | None:
        """The transformer module a name after `prefix` spells (a BFL one after `lora_unet_`: see
        flux_names.parts), None for a UNet name; KronaError for a transformer prefix that names no such module."""
        found = flux_names.transformer_module(prefix, rest)
        if found is None:
            if component != flux_names.TRANSFORMER:
                return None
            raise KronaError(
                f"cannot read {self.kind} key '{key}' in '{self.source}': '{rest}' after '{prefix}' is not a linear "
                f"layer of a {flux_names.TRANSFORMER_TITLES} transformer in diffusers' names"
            )
        module, key_format = found
        self._flux.add(key_format)
        return module

    def module(self, name: str, key: str) -> tuple[str, str, str] | None:
        """(prefix, component, module path as krona's files spell it) of the lora name `name` of `key`, None when
        it has no kohya prefix; KronaError when it cannot be read."""
        found = kohya_prefix(name)
        if found is None:
            return None
        prefix, component = found
        self.prefixes.add(prefix)
        rest = name[len(prefix) :]
        flux = self._transformer(prefix, component, rest, key)
        if flux is not None:
            return prefix, flux_names.TRANSFORMER, flux
        sgm = component == "unet" and bool(_SGM_UNET.match(rest))
        if component == "unet":
            self._namings.setdefault(sgm, key)
            if len(self._namings) > 1:
                raise KronaError(
                    f"'{self.source}' names its UNet layers both the SGM way ('{self._namings[True]}') and the "
                    f"diffusers way ('{self._namings[False]}'); a file uses one naming. The file is damaged"
                )
        try:
            path = decode_path(rest, key, sgm=sgm)
        except KronaError as e:
            raise KronaError(
                f"cannot read the module path of {self.kind} key '{key}' in '{self.source}': it is not made of "
                "diffusers or SGM UNet / CLIP text encoder module names; krona reads files for the SDXL and SD 1.x "
                "UNet and text encoders"
            ) from e
        if sgm:
            config = self._unet_config()
            try:
                path = unet_path_from_sgm(path, config)
            except KronaError as e:
                which = f"the {self._config_name} UNet" if self._given_config is None else "the base model's UNet"
                raise KronaError(
                    f"'{self.source}' names a UNet layer the SGM way ('{key}') that {which} does not have; "
                    "the file was made for another base model"
                ) from e
        return prefix, component, canonical_name(component, path)
