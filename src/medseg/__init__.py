"""medseg: configuration-driven training and benchmarking of medical image segmentation models."""

__version__ = "0.1.0"

__all__ = ["Segmenter", "__version__"]


def __getattr__(name: str):
    # the API pulls in torch and the models: imported on first use, so ``import medseg`` stays light
    if name == "Segmenter":
        from medseg.inference.api import Segmenter

        return Segmenter
    raise AttributeError(f"module 'medseg' has no attribute {name!r}")
