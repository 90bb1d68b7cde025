"""ONNX / TorchScript / ExportedProgram writers and their verification against PyTorch."""

from mambaout.export.writers import FORMATS, ExportReport, export_model, load_exported, verify_exported

__all__ = ["FORMATS", "ExportReport", "export_model", "load_exported", "verify_exported"]
