"""Models: MAE and MV-MAE ViTs, their presets and the timm-style factories."""

from .mae import (FACTORIES, PRESETS, MaskedAutoencoderViT, MVMAE, MVMAEConfig, MVMAEOutput, ViTEncoder,
                  create_model)

globals().update(FACTORIES)

__all__ = ["FACTORIES", "PRESETS", "MaskedAutoencoderViT", "MVMAE", "MVMAEConfig", "MVMAEOutput", "ViTEncoder",
           "create_model", *sorted(FACTORIES)]
