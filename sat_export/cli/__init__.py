"""Every command-line tool of the product, each a thin typer app over one library function.

``export`` (sat-export), ``infer`` (sat-infer), ``eval`` (sat-eval), ``train`` (sat-train); ``common``
holds the shared console and the one-line error handler. Option defaults are read from the
dataclasses the options fill, never retyped. (``sat-bench`` lives in ``benchmarks.cli``: nothing in
this package may import the benchmarks.)
"""
