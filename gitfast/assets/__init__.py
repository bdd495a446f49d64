"""Files shipped with gitfast: the embedded default GIT model and example images."""
