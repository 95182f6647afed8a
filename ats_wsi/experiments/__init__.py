"""The paper's experiments as library code (ATS_SPEC 2.1, 2.2).

* :mod:`ats_wsi.experiments.megapixel_mnist`: ATS and two CNN baselines on Megapixel MNIST,
  with the GPU protocol as its ``accel.device_data`` option;
* :mod:`ats_wsi.experiments.device_protocol`: that protocol's pieces (device-rendered
  batches, :func:`~ats_wsi.experiments.device_protocol.accelerate_`, the full-image feature
  net, side-by-side step costs); no ``run`` of its own;
* :mod:`ats_wsi.experiments.speed_limits`: ATS and a low-res CNN on speed-limit signs;
* :mod:`ats_wsi.experiments.runner`: what both share (config checks, the run scaffold
  :class:`~ats_wsi.experiments.runner.ExperimentRun`, training one model, its cost, figures,
  ``results.json``);
* :mod:`ats_wsi.experiments.cli`: the options and summary of their ``pipelines/`` scripts.

Each experiment module has ``SCHEMA``, ``load_config(path)`` and ``run(cfg, out_dir, ...)``.
"""
