"""Measuring adapters: the toy world's scores of image files and `krona compare` against LoRA (the scorer models are
in scoring/)."""
