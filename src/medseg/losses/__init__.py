from medseg.losses.registry import check_loss_for_scheme, check_loss_keys, create_loss, list_losses, loss_keys

__all__ = ["check_loss_for_scheme", "check_loss_keys", "create_loss", "list_losses", "loss_keys"]
