"""Stage 6, evaluation: per-slice scores (metrics), the evaluate stage (scoring) and its
figure (plot).
"""
