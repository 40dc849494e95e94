"""crossmae: multimodal CrossMAE pretraining on packed, variable-length water data."""

__version__ = "0.1.0"
