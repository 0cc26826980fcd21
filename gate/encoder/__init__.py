"""Contrastive 3D encoder: model, training, ONNX export (imports torch)."""
