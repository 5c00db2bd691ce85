"""Base models in: loading by every route (hub id, cache, folder, single file), the CLIP tokenizer, quantized
bases, prompt encoding, and the tiny pipelines for tests."""
