from medseg.losses.registry import create_loss, list_losses

__all__ = ["create_loss", "list_losses"]
