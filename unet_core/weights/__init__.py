"""Stage 2, loss weights: the paper's w(x) per slice (maps), chunk-parallel with Dask
(blockwise), and its figure (plot).
"""
