"""Stable Diffusion 2.x: one OpenCLIP ViT-H text encoder, 1024-wide text states. Trained at 512 px by default, the
768-px v-prediction models included (as krona always has; their native 768 would change runs without --resolution)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Component, ConfigGet, SingleFile, UiNames
from .unet import NO_SAFETY_CHECKER, UNET_LORA_MODULES, UNET_SCHEDULERS, WHOLE_FILE, UNetFamily, unet


@dataclass(frozen=True)
class SD2Family(UNetFamily):
    def matches_denoiser(self, get: ConfigGet) -> bool:
        return get("addition_embed_type") != "text_time" and get("cross_attention_dim") == self.context_width


_TEXT_PREFIX = "cond_stage_model.model."  # OpenCLIP ViT-H in its own layout, in a single file

SD2 = SD2Family(
    name="sd2",
    title="SD 2.x",
    pipeline_class="StableDiffusionPipeline",
    components=(
        unet("sd2_unet.json"),
        Component(
            "text_encoder",
            "text",
            "clip_vit_h_text.json",
            "tokenizer",
            pad="!",
            kohya_prefix="lora_te_",
            single_file_prefix=_TEXT_PREFIX,
            openclip=True,
        ),
    ),
    context_width=1024,
    default_resolution=512,
    load_extras=NO_SAFETY_CHECKER,
    lora_modules=UNET_LORA_MODULES,
    schedulers=UNET_SCHEDULERS,
    layer_list=False,
    # modelspec: 2.0-768 and 2.1 are v-prediction, 2.0 and 2.1-base epsilon at 512 px. kohya's `sd_v2` is written but
    # not read back as SD 2.x (as before: such a file without krona's metadata is placed by its layer widths)
    ui=UiNames(
        modelspec_id_by_prediction={"v": "stable-diffusion-v2-768-v", "epsilon": "stable-diffusion-v2-512"},
        resolution_by_prediction={"v": 768, "epsilon": 512},
        base_model_version="sd_v2",
        v2="True",
    ),
    # read as the 768-px v-prediction models (2.0-768, 2.1), the configs their single files are used with
    single_file=SingleFile(
        WHOLE_FILE,
        marks=(_TEXT_PREFIX,),
        vae="sd15_vae.json",
        scheduler="sd2_scheduler.json",
        refused="whose text encoder diffusers keeps only in part",
    ),
)
