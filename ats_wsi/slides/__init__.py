"""Whole-slide pipelines: manifests and splits, the demo cohort, per-slide training and
inference, and what inference writes (CSV, heatmaps, zarr, GeoJSON). See docs/slides.md."""
