"""Shared primitives used by every stage: errors, geometry (boxes), atomic outputs, output
ownership (which outputs a stage may replace, and the marks by which it recognises them:
``outputs``), config checks (``config_values``: schema errors in one line, exact numbers), the
samples table (``samples``) and slice selections (``slices``), provenance, progress bars, devices, the mirror
convention and grey-value normalisation. Nothing here knows a stage.
"""
