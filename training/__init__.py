"""The model library, at the bottom of the layers: everything a model is and how it learns.

Config and presets, vocabulary, backbones, the model (``encode`` / ``step``), checkpoints, the one
image preprocessing function (``images``), the search over any ``step`` function (greedy and beam,
``decode``), caption metrics, the dataset and box readers, the synthetic shapes set, the trainer and
the base error types. It knows no runtime and no bundle.

Layer: imports only third-party libraries; never ``engines``, ``sat_export`` or ``benchmarks``.
"""
