"""Stage 6, evaluation: the scores of one slice (pixel_scores, rand_scores, object_matching,
warping_error, on the conventions of score_inputs), the evaluate stage (scoring) and its figure
(plot).
"""
