"""Captioning: inputs (sources), outputs (sinks: rows, resume, lock), the run (``infer``), Ray (``ray_infer``)."""
