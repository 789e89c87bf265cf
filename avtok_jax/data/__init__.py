"""Data: the built-in sounding-video generator, audio/video I/O, TFDS builders, Grain."""
