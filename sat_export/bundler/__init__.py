"""Making bundles: ``sat-export build`` (``builder``), ``check``, the per-checkpoint bundle ``cache``,
TensorRT engines of a bundle (``tensorrt``) and foreign checkpoints (``importers``)."""
