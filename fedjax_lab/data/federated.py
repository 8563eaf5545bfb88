"""FederatedData: the examples of all sites stored ONCE on device, sites as an index table.

A skewed partition costs a few ints of padding per site, never copies of the data: site s
owns `x[idx[s, :count[s]]]`; `idx[s, count[s]:]` is padding (0) and is never read as data
because minibatch positions are taken modulo `count[s]`.

The public calibration set of the curvature optimizers (`optim.public_data`, data/public.py),
if any, lives here too, once and replicated: it belongs to no site.
"""

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.data import partition


@flax.struct.dataclass
class FederatedData:
  x: jax.Array       # [N, ...] float32, all training examples of all sites
  y: jax.Array       # [N] int32 labels, or float32 targets (regression)
  idx: jax.Array     # [sites, n_max] int32 rows into x; padded with 0
  count: jax.Array   # [sites] int32 real examples per site
  num_classes: int = flax.struct.field(pytree_node=False)
  public_x: jax.Array | None = None  # [P, ...] float32 public calibration examples, or None
  public_y: jax.Array | None = None  # [P] int32 their labels (training label space), or None
  # [m, d] float32 canary directions (audit.canaries > 0, attacks/canaries.py), or None: an
  # argument of the jitted round, not a constant compiled into it (m x d would be folded in).
  canary_directions: jax.Array | None = None

  @property
  def num_sites(self) -> int:
    return self.idx.shape[0]

  @property
  def n_max(self) -> int:
    return self.idx.shape[1]


def from_partition(x: np.ndarray, y: np.ndarray, sites: Sequence[np.ndarray],
                   num_classes: int, public_x: np.ndarray | None = None,
                   public_y: np.ndarray | None = None) -> FederatedData:
  """Builds the index table from per-site index arrays (as returned by a partitioner).

  public_x [P, ...], public_y [P]: the public calibration set (`optim.public_data`), or None.
  """
  if isinstance(sites, partition.PoolSites):  # 10^6 sites: no per-site loop
    idx = sites.table
    counts = np.full(len(sites), idx.shape[1], np.int32)
  else:
    counts = np.array([len(s) for s in sites], np.int32)
    idx = np.zeros((len(sites), max(int(counts.max()), 1)), np.int32)
    for s, rows in enumerate(sites):
      idx[s, :len(rows)] = rows
  y_dtype = jnp.float32 if np.issubdtype(np.asarray(y).dtype, np.floating) else jnp.int32
  return FederatedData(x=jnp.asarray(x, jnp.float32), y=jnp.asarray(y, y_dtype),
                       idx=jnp.asarray(idx), count=jnp.asarray(counts), num_classes=num_classes,
                       public_x=None if public_x is None else jnp.asarray(public_x, jnp.float32),
                       public_y=None if public_y is None else jnp.asarray(public_y, jnp.int32))


def site_label_histogram(data: FederatedData) -> np.ndarray:
  """[sites, classes] example counts per label, computed on the host."""
  idx, count, y = np.asarray(data.idx), np.asarray(data.count), np.asarray(data.y)
  real = np.arange(idx.shape[1]) < count[:, None]  # padding rows are not examples
  site = np.broadcast_to(np.arange(data.num_sites)[:, None], idx.shape)[real]
  flat = site.astype(np.int64) * data.num_classes + y[idx[real]]
  return np.bincount(flat, minlength=data.num_sites * data.num_classes).reshape(
      data.num_sites, data.num_classes).astype(np.int64)
