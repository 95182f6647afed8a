"""Attention sampling (Katharopoulos & Fleuret, ICML 2019) for whole-slide histopathology."""

__version__ = "0.1.0"
