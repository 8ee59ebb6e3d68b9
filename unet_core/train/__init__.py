"""Stage 4, training: tiles and validation data (data), the loop (loop) and the curve (plot).
"""
