"""gitfast's benchmark suites, installed as ``gitfast.bench`` (run them with ``gitfast bench``)."""
