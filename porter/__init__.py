"""porter: port HuggingFace modeling files to engine-ready inference models and prove them right."""
__version__ = "0.1.0"
