"""sat-export: export Show-Attend-Tell captioners to ONNX/TensorRT and caption images at scale."""

__version__ = "0.1.0"
