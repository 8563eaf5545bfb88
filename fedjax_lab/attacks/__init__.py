"""Privacy attacks and audits on the lab's models: membership inference (LiRA, membership.py)
and empirical lower bounds on epsilon (audit.py)."""
