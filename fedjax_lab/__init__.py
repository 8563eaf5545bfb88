"""fedjax_lab: one compiled program for private federated learning research."""

__version__ = "0.1.0"
