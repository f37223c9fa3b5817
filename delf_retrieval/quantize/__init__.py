"""Vector quantization for the index: k-means, the coarse quantizer, PQ, LOPQ regions, and the
:class:`Quantizer` that combines them."""

from delf_retrieval.quantize.quantizer import Encoded, IndexParams, Quantizer, train

__all__ = ["Encoded", "IndexParams", "Quantizer", "train"]
