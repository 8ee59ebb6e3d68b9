"""The U-Net (Ronneberger et al. 2015): its geometry (:class:`UNetSpec`) and the network."""

from unet_core.model.spec import UNetSpec

__all__ = ["UNetSpec"]
