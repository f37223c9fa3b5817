"""DELF networks: backbones (one module each), the attention head, and weight loaders."""
