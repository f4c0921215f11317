"""`porter convert`: rewrite a HF modeling file into an engine model (see DESIGN.md, "The converter")."""
from porter.convert.pipeline import ConvertResult, convert_file, convert_source
from porter.convert.report import ConversionError, Report

__all__ = ["ConversionError", "ConvertResult", "Report", "convert_file", "convert_source"]
