"""The adapter file formats users choose from, one list each, in words: what `krona inspect` reads and what
`krona export --to` writes. Help texts and checks read them here (no torch: every `--help` imports this)."""

READ_FORMATS = {
    "native": "krona's own files",
    "lycoris": "LyCORIS/kohya LoKr files",
    "lora": "LoRA files (kohya, diffusers and peft names)",
    "diffusekrona": "official DiffuseKronA checkpoints",
}

EXPORT_FORMATS = {
    "native": "krona's own file",
    "lycoris": "LyCORIS/kohya LoKr, exact",
    "lora": "truncated SVD (kohya's layout for SD and SDXL, diffusers' for the transformer families): ComfyUI, "
    "A1111/Forge, kohya and diffusers all load it",
}
