"""FederatedData: the examples of all sites stored ONCE on device, sites as an index table.

A skewed partition costs a few ints of padding per site, never copies of the data: site s
owns `x[idx[s, :count[s]]]`; `idx[s, count[s]:]` is padding (0) and is never read as data
because minibatch positions are taken modulo `count[s]`.
"""

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class FederatedData:
  x: jax.Array       # [N, ...] float32, all training examples of all sites
  y: jax.Array       # [N] int32
  idx: jax.Array     # [sites, n_max] int32 rows into x; padded with 0
  count: jax.Array   # [sites] int32 real examples per site
  num_classes: int = flax.struct.field(pytree_node=False)

  @property
  def num_sites(self) -> int:
    return self.idx.shape[0]

  @property
  def n_max(self) -> int:
    return self.idx.shape[1]


def from_partition(x: np.ndarray, y: np.ndarray, sites: Sequence[np.ndarray],
                   num_classes: int) -> FederatedData:
  """Builds the index table from per-site index arrays (as returned by a partitioner)."""
  counts = np.array([len(s) for s in sites], np.int32)
  idx = np.zeros((len(sites), max(int(counts.max()), 1)), np.int32)
  for s, rows in enumerate(sites):
    idx[s, :len(rows)] = rows
  return FederatedData(x=jnp.asarray(x, jnp.float32), y=jnp.asarray(y, jnp.int32),
                       idx=jnp.asarray(idx), count=jnp.asarray(counts), num_classes=num_classes)


def site_label_histogram(data: FederatedData) -> np.ndarray:
  """[sites, classes] example counts per label, computed on the host."""
  idx, count, y = np.asarray(data.idx), np.asarray(data.count), np.asarray(data.y)
  hist = np.zeros((data.num_sites, data.num_classes), np.int64)
  for s in range(data.num_sites):
    np.add.at(hist[s], y[idx[s, :count[s]]], 1)
  return hist
