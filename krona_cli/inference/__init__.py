"""Using adapters: sampling, baking into weights (merge), export to other formats, parameter plans."""
