"""The mesh over the sites axis, and multi-host setup.

Every array with a leading sites axis (the cohort's index rows, per-site state such as FedBN
statistics or SCAFFOLD controls) is sharded over ALL devices along the mesh axis "sites";
the examples and the global model are replicated. One process per host calls
`initialize_distributed()` first; the same program then sees every host's devices.
"""

import os

import jax
import jax.numpy as jnp
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


def default_sites_per_chunk() -> int:
  """`sites_per_chunk` when the config leaves it unset: 64 on CPU, where chunking keeps a
  chunk's working set in cache (benchmarks/site_chunking.py); 0 (one vmap) on GPU and TPU,
  whose throughput needs the widest batch (chunk there only to bound memory)."""
  return 64 if jax.default_backend() == "cpu" else 0


def map_sites(fn, in_axes, mesh: Mesh | None, sites_per_chunk: int):
  """`jax.vmap(fn, in_axes)` over the sites axis, each device running its sites in chunks.

  in_axes: 0 (the argument has a leading sites axis) or None (shared), one per argument.
  With the sites split over `mesh`'s devices, each device trains `sites_per_chunk` of its own
  sites at a time (`lax.map` with `batch_size`), not all at once: one vmap over thousands of
  sites streams every site's activations and gradients through memory at each local step,
  while a chunk stays in cache through all of them (benchmarks/site_chunking.py: 1.3-1.4x
  at 1,000 and 10,000 sites a round on 2 CPU cores). It also bounds the memory of
  per-example gradients under DP to one chunk's. Each site's computation is unchanged: same
  function, same keys. `sites_per_chunk=0` is one vmap over all sites.
  """
  vmapped = jax.vmap(fn, in_axes=in_axes)
  shards = 1 if mesh is None else mesh.size

  def run(*args):
    mapped = [i for i, axis in enumerate(in_axes) if axis == 0]
    n = jax.tree.leaves([args[i] for i in mapped])[0].shape[0]
    per_shard = -(-n // shards)
    if not sites_per_chunk or per_shard <= sites_per_chunk:
      return vmapped(*args)
    pad = per_shard * shards - n  # padded with copies of the last site, dropped at the end

    def split(a):
      if pad:
        a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)])
      return a.reshape(shards, per_shard, *a.shape[1:])

    parts = [constrain_sites(jax.tree.map(split, args[i]), mesh) for i in mapped]

    def one_shard(*shard_parts):
      def one_site(site_parts):
        full = list(args)
        for i, part in zip(mapped, site_parts):
          full[i] = part
        return fn(*full)
      return jax.lax.map(one_site, shard_parts, batch_size=sites_per_chunk)

    out = constrain_sites(jax.vmap(one_shard)(*parts), mesh)
    return jax.tree.map(lambda a: a.reshape(shards * per_shard, *a.shape[2:])[:n], out)

  return run
