"""Figures for QC, correction and reports."""
