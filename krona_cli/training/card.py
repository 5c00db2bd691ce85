"""The model card (`README.md`) written beside a trained adapter: what it is, how it was trained, how to use it."""

from __future__ import annotations

from pathlib import Path

from ..atomic import write_bytes_atomic
from .config import TrainConfig, drop_t5_flag

_USE_KRON = """\
## Use it

krona (samples with the adapter merged into the weights in memory):

```bash
krona sample --adapter {adapter} --pretrained-model {base} --prompt "{prompt}" -n 4{drop}
```

diffusers: bake the adapter into a full pipeline once, then load that folder as any other model:

```bash
krona merge --adapter {adapter} --pretrained-model {base} --output-dir merged/
```

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("merged/")
image = pipe("{prompt}").images[0]
```

ComfyUI, A1111/Forge (LyCORIS LoKr loaders): convert, copy to `models/loras/`, and load it with a LoRA loader node:

```bash
krona export --adapter {adapter} --to lycoris --output {name}-lokr.safetensors
```
"""

_USE_LORA = """\
## Use it

This is a LoRA in diffusers' format (trained as krona's baseline).

diffusers:

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("{folder}", weight_name="adapter.safetensors")
image = pipe("{prompt}").images[0]
```

krona: `krona sample --adapter {adapter} --pretrained-model {base} --prompt "{prompt}"{drop}`.
ComfyUI reads kohya-named LoRA files best; diffusers-named keys may need converting.
"""


_KEPT = {
    "both": "`best/adapter.safetensors` holds it, `adapter.safetensors` the last step",
    "best": "`adapter.safetensors` holds it (`--keep best`)",
    "last": "not kept: `adapter.safetensors` holds the last step (`--keep last`)",
}


_KINDS = {"kron": "Kronecker (DiffuseKronA)", "lora": "LoRA", "lokr": "Kronecker (peft's LoKr layers)"}


def write_model_card(
    out: Path, cfg: TrainConfig, arch: str, steps: int, params: int, grid: Path | None, best=None
) -> Path:
    """Write `out/README.md` atomically; return its path. `best`: the validation's chosen step
    (validation.Choice), if any."""
    adapter = out / "adapter.safetensors"
    shape = f"rank {cfg.rank}" if cfg.adapter_type == "lora" else f"factors {cfg.factors}"
    rows = [
        ("base model", f"`{cfg.pretrained_model}` ({arch})"),
        (
            "adapter",
            f"{_KINDS[cfg.adapter_type]}, {shape}, scale {cfg.scale:g}, "
            f"targets `{cfg.targets}`"
            + (", text encoders too" if cfg.train_text_encoder else "")
            + (f", A drawn by `--kron-init {cfg.kron_init}`" if cfg.kron_init != "normal" else ""),
        ),
        ("trainable parameters", f"{params:,}"),
        ("instance prompt", f"`{cfg.prompt}`"),
        (
            "prior preservation",
            f"`{cfg.class_prompt}`, {cfg.num_class_images} class images, weight {cfg.prior_loss_weight:g}"
            if cfg.class_prompt
            else "off",
        ),
        ("steps", f"{steps} (batch {cfg.batch_size} × {cfg.grad_accum} accumulation per process)"),
        ("learning rate", f"{cfg.effective_lr():g}, {cfg.lr_scheduler}, {cfg.optimizer}"),
        ("resolution", f"{cfg.effective_resolution(arch)} px"),
        ("precision", cfg.mixed_precision),
        ("EMA", f"decay {cfg.ema_decay:g} (the saved weights are the EMA)" if cfg.ema else "off"),
        ("seed", str(cfg.seed)),
    ]
    lines = [
        f"# {out.name}: a {'LoRA' if cfg.adapter_type == 'lora' else 'Kronecker'} adapter for `{cfg.prompt}`",
        "",
        "Trained DreamBooth-style with krona; the full settings are in `config.yaml`.",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
    ]
    if grid is not None:
        lines += [f"![samples after step {steps}]({grid.relative_to(out).as_posix()})", ""]
    if cfg.validate_every:
        lines += ["## Validation", ""]
        if best is not None:
            lines.append(
                f"The best step is **{best.step}** of {steps} ({cfg.scorer} scorer): {best.why}. {_KEPT[cfg.keep]}."
            )
        else:
            lines.append("No best step is chosen without `--scorer`; the validation losses are recorded.")
        lines += ["Every validation is in `validation.json`, plotted in `validation.png`.", ""]
    template = _USE_LORA if cfg.adapter_type == "lora" else _USE_KRON
    lines.append(
        template.format(
            adapter=adapter,
            base=cfg.pretrained_model,
            prompt=cfg.prompt,
            name=out.name,
            folder=out,
            drop=drop_t5_flag(cfg.drop_t5),
        )
    )
    return write_bytes_atomic(out / "README.md", "\n".join(lines).encode())
