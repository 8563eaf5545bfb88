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


def initialize_distributed() -> bool:
  """Joins a multi-process run when the environment describes one; True if it did.

  Either JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID are set for every process, or a cluster JAX auto-detects launched it (SLURM
  with several tasks; TPU pods). Must run before anything touches a device. On CPU hosts the
  processes exchange the sites' sums with gloo collectives.
  """
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not address and os.environ.get("SLURM_NTASKS", "1") == "1":
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if not address:
    jax.distributed.initialize()  # SLURM: JAX reads the task layout itself
    return True
  missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]
  if missing:
    raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not; set "
                     "JAX_NUM_PROCESSES and JAX_PROCESS_ID (0 .. N-1) for every process")
  jax.distributed.initialize(coordinator_address=address,
                             num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                             process_id=int(os.environ["JAX_PROCESS_ID"]))
  return True


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named "sites" over the given devices (default: every device JAX sees)."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  # Auto axis types keep classic sharding propagation (jax 0.10 defaults to Explicit).
  return Mesh(devices.reshape(-1), (SITES,), axis_types=(jax.sharding.AxisType.Auto,))


def round_devices(sites_per_round: int, min_sites_per_device: int) -> list:
  """The devices a FedAvg-style round should run on: every device JAX sees, except on one
  CPU host whose round would not split its sites anyway (mesh_if_worth_it): then the first.

  The host's CPU devices are slices of one machine (fedjax_lab/__init__.py); a replicated
  round on all of them repeats the same work on each and pays their synchronisation at every
  step (10 sites a round: 0.58 ms on two devices, 0.31 ms on one; benchmarks/RESULTS.md).
  Accelerators and multi-process runs keep every device: there the devices are real, and a
  multi-process program must span them all.
  """
  devices = jax.devices()
  if (jax.default_backend() == "cpu" and jax.process_count() == 1
      and mesh_if_worth_it(make_mesh(devices), sites_per_round, min_sites_per_device) is None):
    return devices[:1]
  return devices


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


def map_sum_sites(fn, in_axes, mesh: Mesh | None, sites_per_chunk: int):
  """Maps `fn` over the sites axis and sums part of its output over the sites.

  fn(*args) -> (to_sum, per_site) for ONE site; run(*args) -> (Σ_sites to_sum, per_site
  stacked [sites, ...]). in_axes: 0 (the argument has a leading sites axis) or None (shared),
  one per argument.

  With `sites_per_chunk` > 0, each device (of `mesh`, or the one device) trains that many of
  its own sites at a time (a lax.scan over chunks of a vmap) and adds each chunk's `to_sum`
  into a running total, instead of one vmap over all its sites followed by a sum over a
  [sites, ...] array: a chunk's activations, gradients and updates stay in cache through the
  local steps and the sum, and memory holds one chunk's per-site updates, not every site's
  (benchmarks/site_chunking.py measures it). Each site's computation is unchanged: same
  function, same keys; sites added to fill the last chunk are copies whose `to_sum` is zeroed
  and whose `per_site` rows are dropped. `sites_per_chunk=0`: one vmap, then the sum.
  """
  vmapped = jax.vmap(fn, in_axes=in_axes)
  shards = 1 if mesh is None else mesh.size

  def run(*args):
    mapped = [i for i, axis in enumerate(in_axes) if axis == 0]
    n = jax.tree.leaves([args[i] for i in mapped])[0].shape[0]
    if not sites_per_chunk or -(-n // shards) <= sites_per_chunk:
      to_sum, per_site = vmapped(*args)
      return jax.tree.map(_sum_sites, to_sum), per_site
    chunks = -(-n // (shards * sites_per_chunk))  # per device
    padded = shards * chunks * sites_per_chunk

    def split(a):
      if padded > n:
        a = jnp.concatenate([a, jnp.repeat(a[-1:], padded - n, axis=0)])
      return a.reshape(shards, chunks, sites_per_chunk, *a.shape[1:])

    parts = constrain_sites(
        [jax.tree.map(split, args[i]) for i in mapped]
        + [(jnp.arange(padded) < n).reshape(shards, chunks, sites_per_chunk)], mesh)

    def with_sites(site_parts):
      full = list(args)
      for i, part in zip(mapped, site_parts):
        full[i] = part
      return full

    one_site = [jax.tree.map(lambda a: a[0, 0, 0], p) for p in parts[:-1]]
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                         jax.eval_shape(lambda *a: fn(*with_sites(a))[0], *one_site))

    def one_device(*device_parts):
      def chunk(total, chunk_parts):
        *site_parts, valid = chunk_parts
        to_sum, per_site = vmapped(*with_sites(site_parts))
        total = jax.tree.map(lambda t, a: t + _sum_sites(a, valid), total, to_sum)
        return total, per_site
      return jax.lax.scan(chunk, zeros, device_parts)

    totals, per_site = jax.vmap(one_device)(*parts)
    per_site = jax.tree.map(lambda a: a.reshape(padded, *a.shape[3:])[:n], per_site)
    return jax.tree.map(lambda a: a.sum(0), totals), per_site

  return run


def _sum_sites(a, weights=None):
  """Σ over the leading axis, as a product with a vector of `weights` (default ones): XLA's CPU
  backend runs that as a matrix-vector product, ~2x faster than its reduce over the leading
  axis of a [sites, ...] array (benchmarks/site_chunking.py, one vmap)."""
  weights = jnp.ones(a.shape[:1], a.dtype) if weights is None else weights.astype(a.dtype)
  return jnp.tensordot(weights, a, axes=1)
