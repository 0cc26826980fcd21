"""Export writers, installed and imported as ``gate.exporters``."""
