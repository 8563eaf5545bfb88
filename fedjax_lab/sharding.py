"""The mesh over the sites axis, and multi-host setup.

Every array with a leading sites axis (the cohort's index rows, per-site state such as FedBN
statistics or SCAFFOLD controls) is sharded over ALL devices along the mesh axis "sites";
the examples and the global model are replicated. One process per host calls
`initialize_distributed()` first; the same program then sees every host's devices.
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

SITES = "sites"


def initialize_distributed() -> None:
  """Starts jax.distributed when launched as one of several processes.

  Reads the standard JAX variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID) or a cluster JAX auto-detects (SLURM, TPU pods); a single process does nothing.
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1":
    jax.distributed.initialize()


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named "sites" over the given devices (default: every device JAX sees)."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  # Auto axis types keep classic sharding propagation (jax 0.10 defaults to Explicit).
  return Mesh(devices.reshape(-1), (SITES,), axis_types=(jax.sharding.AxisType.Auto,))


def sites_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(SITES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def mesh_if_worth_it(mesh: Mesh | None, sites: int, min_sites_per_device: int) -> Mesh | None:
  """The mesh to split `sites` over, or None when each device would get too few."""
  if mesh is None or sites < min_sites_per_device * mesh.size:
    return None
  return mesh


def constrain_sites(tree, mesh: Mesh | None):
  """Inside jit: shard every leaf's leading (sites) axis over the mesh."""
  if mesh is None or mesh.size == 1:
    return tree
  return jax.tree.map(
      lambda a: jax.lax.with_sharding_constraint(a, sites_sharding(mesh, a.ndim)), tree)


def constrain_replicated(tree, mesh: Mesh | None):
  """Inside jit: keep small per-cohort vectors (weights) whole on every device."""
  if mesh is None or mesh.size == 1:
    return tree
  return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, replicated(mesh)), tree)


def put_sites(tree, mesh: Mesh | None):
  """Outside jit: place per-site arrays [sites, ...] sharded over the mesh.

  A committed array must split evenly, so a sites axis that the device count does not divide
  is replicated instead (choose num_sites a multiple of the device count to shard it).
  """
  if mesh is None:
    return tree
  return jax.tree.map(lambda a: jax.device_put(
      a, sites_sharding(mesh, a.ndim) if a.shape[0] % mesh.size == 0 else replicated(mesh)),
      tree)


def put_replicated(tree, mesh: Mesh | None):
  if mesh is None:
    return tree
  return jax.device_put(tree, replicated(mesh))
