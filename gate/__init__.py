"""gate: the privacy gate for synthetic 3D medical images.

Synthetic volumes are embedded by a contrastive encoder (ONNX), looked up in an HNSW index of
the training patients, judged under a YAML policy, and only those that pass are exported.
"""

__version__ = "0.1.0"
