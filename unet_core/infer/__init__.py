"""Stage 5, inference: overlap-tile geometry (tiling), one predict job (predict), the gather
(merge) and cell instances (instances).
"""
