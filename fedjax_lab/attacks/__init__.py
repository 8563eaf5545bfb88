"""Privacy attacks and audits on the lab's models: membership inference (LiRA, membership.py),
empirical lower bounds on epsilon (audit.py) and gradient inversion of federated updates
(inversion.py)."""
