"""gate: the privacy gate for synthetic 3D medical images.

Synthetic volumes are embedded by a contrastive encoder (ONNX), looked up in an HNSW index of
the training patients, judged under a YAML policy, and only those that pass are exported.
"""

__version__ = "0.1.0"

__all__ = ["CheckResult", "Gate", "__version__"]


def __getattr__(name: str) -> object:
    """``gate.Gate`` and ``gate.CheckResult`` from :mod:`gate.api`, imported on first use.

    ``import gate`` stays light (the CLI imports it for its version): numpy, onnxruntime and
    hnswlib load only when the API is used.
    """
    if name in ("Gate", "CheckResult"):
        from gate import api

        return getattr(api, name)
    raise AttributeError(f"module 'gate' has no attribute {name!r}")
