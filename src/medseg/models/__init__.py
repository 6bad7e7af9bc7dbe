from medseg.models.registry import create_model, list_models, register_model

# importing the family modules registers their models
from medseg.models import resenc_unet, transformer, umamba, unet, vilu_net  # noqa: F401,E402

__all__ = ["create_model", "list_models", "register_model"]
