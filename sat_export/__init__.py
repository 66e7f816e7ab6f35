"""sat-export, the product: bundles, export, parity, quantisation, importers, inference, evaluation, CLIs.

The bundle format has one owner (``bundle``); ``registry`` turns "model + backend name" into an
open ``engines`` backend; ``build`` exports, gates (``parity``) and quantises; ``infer`` and
``ray_infer`` caption folders; ``evaluate`` scores them; every command-line tool is in ``cli``.

Layer: may import ``engines`` and ``training``; never ``benchmarks``.
"""

__version__ = "0.1.0"
