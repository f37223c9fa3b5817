"""Where images come from: decoding with limits (images), and listing, stable ids and bounded reads of
any source (inputs)."""
