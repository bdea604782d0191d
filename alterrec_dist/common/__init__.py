"""Shared by every folder: errors, atomic files and manifests, the typed config, the method registry, devices, CLI helpers."""
