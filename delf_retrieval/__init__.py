"""DELF landmark retrieval's core library: extraction, the index, and queries answered with votes,
RANSAC and verified expansion. No Apache Beam here: ``transforms/`` and ``pipeline/`` stay thin
around it. The Python API (docs/python-api.md)::

    import delf_retrieval as delf
    index = delf.open_index("output/sample-index")
    hits = index.search("photo.jpg", top=10)
    feats = delf.extract("photo.jpg")
"""

from delf_retrieval.api import Index, extract, open_index, to_rgb
from delf_retrieval.extraction.features import Features
from delf_retrieval.query.matching import Match

__version__ = "0.1.0"
__all__ = ["Features", "Index", "Match", "extract", "open_index", "to_rgb"]
