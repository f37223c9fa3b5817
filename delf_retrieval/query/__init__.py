"""Answering a query: matches, retrieval, RANSAC verification, expansion, the engine, the live
version and evaluation."""
