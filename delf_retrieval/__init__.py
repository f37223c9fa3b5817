"""Core library of the DELF landmark retrieval system: model, extraction and (later) index, search,
verification and evaluation. No Apache Beam imports here: the Beam code in ``transforms/`` and
``pipeline/`` stays a thin layer around these functions."""

__version__ = "0.1.0"
