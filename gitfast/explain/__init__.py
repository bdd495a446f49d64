"""Explanation: which pixels each word of a caption came from.

`maps` decodes a caption again in one plain pass and reads one map per generated token over the image's
patch grid from attention probabilities or their gradients (`maps.METHODS`; the shipped one,
`maps.DEFAULT`, chosen by a pointing game). It changes nothing of the fast path and runs only when maps
are asked for. Drawing maps and writing them beside captions is the captioning wing's
(`captioning/with_maps.py`, `captioning/maps_png.py`); the pointing game that scores them is training's
(`training/pointing.py`).
"""
