"""Reference GRPO, CRPO and GiGPO trainers on the grouped (shared-prefix) layout."""
from .loss import LOSS_TYPES, policy_loss

__all__ = ["LOSS_TYPES", "policy_loss"]
