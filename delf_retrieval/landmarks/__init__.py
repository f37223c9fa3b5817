"""Landmarks: images clustered by verified matches and GPS, their table, and recognition at query time."""
