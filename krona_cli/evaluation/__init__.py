"""Measuring adapters: the paper's scorers (CLIP-I, CLIP-T, DINO) and `krona compare` against LoRA."""
