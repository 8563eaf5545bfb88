"""The global state as the run loop handles it: its hash in summary.json and its placement on
the mesh. Apart from experiment.py (which builds the state) so that run_loop.py, which runs
an Experiment, does not import the module that imports it."""

import hashlib

import jax
import numpy as np

from fedjax_lab import sharding


def params_sha256(params) -> str:
  """SHA-256 of the leaves in jax.tree order as little-endian float32 bytes (docs/design.md)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    h.update(np.asarray(leaf, dtype="<f4").tobytes())
  return h.hexdigest()


def place_state(state, mesh):
  """The state replicated, except its per-site fields (named site_*, leaves [sites, ...]),
  sharded over the mesh as the rounds keep them: the jitted round then sees the same input
  shardings at every call and compiles once."""
  state = sharding.put_replicated(state, mesh)
  return state._replace(**{f: sharding.put_sites(getattr(state, f), mesh)
                           for f in state._fields if f.startswith("site_")})
