"""`python -m mnist_service`: the command line."""

from .cli import app

app(prog_name="mnist-service")
