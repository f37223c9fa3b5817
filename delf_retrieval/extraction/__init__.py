"""From an image to its features: the pyramid and keypoint selection, feature files, presets,
receptive fields and pictures."""
