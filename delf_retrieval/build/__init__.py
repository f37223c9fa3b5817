"""The plan of a build (its settings, mode and per-input actions) and the encoding of its images."""
