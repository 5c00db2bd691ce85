"""`krona train`: settings, the run and its phases, data, buckets, class images, EMA, checkpoints, the model card."""
