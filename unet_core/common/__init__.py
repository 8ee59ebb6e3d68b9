"""Shared primitives used by every stage: errors, geometry (boxes), atomic outputs, provenance,
progress bars, devices, the mirror convention and grey-value normalisation. Nothing here knows a stage.
"""
