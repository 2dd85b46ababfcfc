"""Training of the MNIST models: real data (``training.data``), architectures and the training loop.

Importing this package does not import torch; ``training.data`` needs only numpy.
"""
