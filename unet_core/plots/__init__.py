"""Figures for the report: one module per stage, PNG out, matplotlib's Agg backend."""

import matplotlib

matplotlib.use("Agg")
