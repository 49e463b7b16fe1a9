"""Offline text sources for calibration and evaluation."""

from slimformer.data.text import BUILTIN_SOURCES, TextSpec, documents, load_texts, split_of

__all__ = ["BUILTIN_SOURCES", "TextSpec", "documents", "load_texts", "split_of"]
