"""Quantised graphs of a bundle: ONNX Runtime int8/fp16 (``ort``), the int8 search (``search``), NNCF for OpenVINO (``openvino``)."""
