"""The label convention every module shares: class maps hold 0..C-1, and 255 marks a pixel
that carries no class (void, padding, an unused pseudo label)."""

IGNORE_INDEX = 255
