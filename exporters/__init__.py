"""Export writers, installed and imported as ``gate.exporters``.

``EXPORTERS`` maps a format name to its exporter class (a dict is enough; no factories).
"""

from __future__ import annotations

from gate.exporters.base import Exporter, ExportRefusedError
from gate.exporters.dicom import DicomExporter
from gate.exporters.nifti import NiftiExporter

EXPORTERS: dict[str, type[Exporter]] = {"nifti": NiftiExporter, "dicom": DicomExporter}
"""Format name -> exporter class, as named on the command line and in bundle manifests."""

__all__ = ["EXPORTERS", "DicomExporter", "ExportRefusedError", "Exporter", "NiftiExporter"]
