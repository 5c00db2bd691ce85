"""krona: DreamBooth personalisation of SDXL and SD 1.x/2.x with Kronecker-product adapters (DiffuseKronA)."""

__version__ = "0.1.0"
