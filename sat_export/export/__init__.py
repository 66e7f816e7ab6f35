"""Making graphs: torch -> ONNX checked against the I/O contract (``onnx``), and parity between any two backends (``parity``)."""
