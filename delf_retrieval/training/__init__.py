"""Training DELF in the paper's two steps: descriptor fine-tuning, then the attention head with the
descriptor frozen, from landmark labels alone; export as a model directory extraction reads."""

STEPS = ("descriptor", "attention")  # the paper's two steps, in order (here: no TensorFlow to import)
