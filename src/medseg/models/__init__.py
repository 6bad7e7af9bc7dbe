from medseg.models.registry import (ModelSpec, adapt_patch_for_model, check_model_keys, create_model, list_models,
                                    model_spec, register_model, register_preset)

# importing the family modules registers their models
from medseg.models import resenc_unet, transformer, umamba, unet, vilu_net  # noqa: F401

__all__ = ["ModelSpec", "adapt_patch_for_model", "check_model_keys", "create_model", "list_models", "model_spec",
           "register_model", "register_preset"]
