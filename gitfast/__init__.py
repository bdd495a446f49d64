"""gitfast: fast inference for Microsoft's GIT image-to-text models."""
__version__ = "0.1.0"
