"""medseg: configuration-driven training and benchmarking of medical image segmentation models."""

__version__ = "0.1.0"
