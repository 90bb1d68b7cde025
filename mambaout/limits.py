"""The input sizes every part accepts: the one bound that flags, recipes and hub configs are checked against."""

__all__ = ["MAX_INPUT_SIZE", "MIN_INPUT_SIZE"]

MIN_INPUT_SIZE = 16
MAX_INPUT_SIZE = 4096  # 4096² is 16.8M pixels a sample: 3x ADE20K's 512x2048, far past any published setting
