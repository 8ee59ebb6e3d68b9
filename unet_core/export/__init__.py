"""Models that travel: a trained model written as a bioimage.io package (``unet export-bioimageio``)."""
