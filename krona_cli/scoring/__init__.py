"""Scoring generated pictures with models: CLIP-I, CLIP-T and DINO (for `krona eval`, `krona compare` and the
validation while training)."""
