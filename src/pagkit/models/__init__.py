"""The embedded Fashion-MNIST models: a class-conditional pixel U-Net and the feature classifier."""

from pagkit.models.classifier import ClassifierConfig, FashionClassifier, load_classifier
from pagkit.models.unet import NULL_CLASS, DenoiserConfig, build_unet, load_denoiser

__all__ = [
    "NULL_CLASS",
    "ClassifierConfig",
    "DenoiserConfig",
    "FashionClassifier",
    "build_unet",
    "load_classifier",
    "load_denoiser",
]
