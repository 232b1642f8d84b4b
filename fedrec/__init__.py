"""fedrec: federated two-tower recommendation where only the item tower leaves a merchant."""

__version__ = "0.1.0"
