"""Saving and loading compressed model folders."""

from slimformer.io.serialization import load_compressed, read_manifest, save_compressed, update_manifest

__all__ = ["load_compressed", "read_manifest", "save_compressed", "update_manifest"]
