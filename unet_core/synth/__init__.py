"""Stage 1's embedded sample data (``unet synth``): the synthetic scene of a slice, pure numpy
(scene), and the stack written as TIFF files (tiffs).
"""
