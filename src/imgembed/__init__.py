"""imgembed: train image-embedding models with triplet loss, reproducibly."""

__version__ = "0.1.0"
