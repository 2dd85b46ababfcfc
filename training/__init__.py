"""Training of the MNIST models: real data (``training.data``), architectures and the training loop.

Importing this package does not import torch; ``training.data``, the one MNIST reader, needs
only numpy. training never imports export: export builds on training, not the reverse.
"""
