"""Beam PTransforms and DoFns: thin wrappers that call the core library ``delf_retrieval``."""
