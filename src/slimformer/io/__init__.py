"""Saving and loading compressed model folders."""

from slimformer.io.serialization import load_compressed, read_manifest, save_compressed, update_manifest
from slimformer.models.loading import register_compressed_folder_loader

register_compressed_folder_loader(load_compressed)

__all__ = ["load_compressed", "read_manifest", "save_compressed", "update_manifest"]
