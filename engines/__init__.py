"""Runtimes: the graph I/O contract and the backends that honour it, each built from file paths.

``contract`` declares what the encoder and decoder_step graphs take and give; ``torch_eager``,
``ort``, ``trt`` and ``openvino`` run a model (a checkpoint file, two ONNX files, two TensorRT plans,
an encoder for OpenVINO beside an ONNX decoder step) behind the ``base.Backend`` protocol
(``encode`` / ``step``), and ``trt_build`` turns an ONNX file into a plan.
Backends never open a bundle: ``sat_export.registry`` reads bundles and picks the backend.

Layer: may import ``training`` (and third-party libraries); never ``sat_export`` or ``benchmarks``.
"""
