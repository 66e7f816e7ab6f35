"""sat-export, the product: bundles, export, parity, quantisation, importers, inference, evaluation, CLIs.

Sub-packages, each importing only those below it (import-linter, ``pyproject.toml``):

- ``cli``: every command-line tool, thin typer apps.
- ``pipeline``: captioning: inputs (sources), outputs (sinks), the run, Ray scale-out.
- ``reports``: ``sat-eval`` scores, attention overlays, the HTML report and gallery.
- ``results``: where a run's results lie on disk, for the pipeline that writes and the reports that read them.
- ``registry``: "model + backend name" -> an open ``engines`` backend.
- ``build``: ``sat-export build``/``check``, the per-checkpoint bundle cache, TensorRT engines, importers.
- ``quantize``: ONNX Runtime int8/fp16 graphs, the int8 search, NNCF for OpenVINO.
- ``export``: torch -> ONNX and parity between any two backends.
- ``bundle``: the bundle format and its seal (one owner), the manifest schema.

``errors``, ``text`` and ``assets`` (the demo model) are used by all. Layer: may import ``engines`` and
``training``; never ``benchmarks``.
"""

__version__ = "0.1.0"
