"""Stage 3, deformed training sets: the elastic deformation (elastic), the stored sets
(samples) and their figure (plot).
"""
