"""Privacy attacks on federated updates (gradient inversion: inversion.py)."""
