"""unet-pipeline core: the U-Net of Ronneberger et al. (2015) as a reproducible batch pipeline.

Pure array-in/array-out functions live in the stage modules (``weights``, ``elastic``,
``tiling``, ``rand_scores`` ...); thin adapters do the I/O (``ngff``, ``atomic``); ``cli``
exposes every stage as ``unet <stage>``.
"""

__version__ = "0.1.0"
