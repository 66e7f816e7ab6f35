"""Inference backends (PyTorch eager, ONNX Runtime, TensorRT) and the decode loop that drives them."""
