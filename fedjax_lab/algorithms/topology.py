"""Communication graphs of decentralized algorithms and their Metropolis-Hastings mixing.

Graphs (undirected, no self loops; `build(name, num_sites, ...)`):
  ring         i ~ i +- 1 (mod S)
  torus        2-D torus rows x cols = S (rows the largest divisor <= sqrt(S)); i ~ 4 neighbours
  exponential  i ~ i +- 2^k (mod S), k = 0 .. floor(log2(S - 1)): the static exponential graph
               of Ying et al. 2021 ("Exponential Graph is Provably Efficient for Decentralized
               Deep Training") made undirected, so that its mixing matrix is symmetric
  erdos_renyi  every pair independently with probability p (redrawn until connected)
  complete     every pair
  star         site 0 ~ every other site

Mixing matrix (Metropolis-Hastings, e.g. Xiao & Boyd 2004):
  W_ij = 1 / (1 + max(d_i, d_j))  for an edge i ~ j,   W_ii = 1 - sum_{j ~ i} W_ij,
symmetric and doubly stochastic for any graph. `mix` applies W through neighbour lists (an
edge list [E] of (receiver, sender, weight) and a segment sum), so a mixing step costs
O(edges x model), never a dense [S, S] matmul; the complete graph, whose W is exactly the
average 11^T / S, is mixed as a mean. The dense W exists only on the host, for tests and the
spectral gap 1 - max(|lambda_2|, |lambda_S|) that decides how fast gossip reaches consensus.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from fedjax_lab.errors import ArgumentError, ConfigError, config_keys

TOPOLOGIES = ("ring", "torus", "exponential", "erdos_renyi", "complete", "star")
_DENSE_EIG_MAX_SITES = 2048  # above this the spectral gap comes from sparse Lanczos


class Topology(NamedTuple):
  """An undirected graph over S sites with its Metropolis-Hastings weights (host NumPy).

  receivers, senders: [E] int32, both directions of every edge (E = sum of degrees).
  edge_weights: [E] float64, W[receivers[e], senders[e]] (cast to the model's dtype in `mix`).
  self_weights: [S] float64, W_ii.
  """
  name: str
  num_sites: int
  receivers: np.ndarray
  senders: np.ndarray
  edge_weights: np.ndarray
  self_weights: np.ndarray

  @property
  def degrees(self) -> np.ndarray:
    """[S] neighbours per site."""
    return np.bincount(self.receivers, minlength=self.num_sites)

  @property
  def messages_per_gossip(self) -> int:
    """Models sent in one gossip step: every site sends its model to each neighbour."""
    return int(len(self.senders))

  def mixing_matrix(self) -> np.ndarray:
    """The dense [S, S] float64 W (host only: tests and the spectral gap)."""
    w = np.diag(self.self_weights)
    np.add.at(w, (self.receivers, self.senders), self.edge_weights)
    return w


def _edges_ring(n):
  return [(i, (i + 1) % n) for i in range(n)]


def _torus_shape(n):
  rows = max(d for d in range(1, int(np.sqrt(n)) + 1) if n % d == 0)
  return rows, n // rows


def _edges_torus(n):
  rows, cols = _torus_shape(n)
  if n == 1:
    return []
  if rows < 2:
    raise ArgumentError("topology",
                        f"torus needs num_sites = rows x cols with rows, cols >= 2; {n} is "
                        "prime; use e.g. 16 (4 x 4) or 12 (3 x 4), or topology 'ring'")
  site = lambda r, c: (r % rows) * cols + (c % cols)
  return [(site(r, c), other) for r in range(rows) for c in range(cols)
          for other in (site(r + 1, c), site(r, c + 1))]


def _edges_exponential(n):
  hops = [2 ** k for k in range(int(np.floor(np.log2(n - 1))) + 1)] if n > 1 else []
  return [(i, (i + h) % n) for i in range(n) for h in hops]


def _edges_complete(n):
  return [(i, j) for i in range(n) for j in range(i + 1, n)]


def _edges_star(n):
  return [(0, j) for j in range(1, n)]


def _connected(n, pairs) -> bool:
  adjacency = [[] for _ in range(n)]
  for i, j in pairs:
    adjacency[i].append(j)
    adjacency[j].append(i)
  seen, stack = {0}, [0]
  while stack:
    for j in adjacency[stack.pop()]:
      if j not in seen:
        seen.add(j)
        stack.append(j)
  return len(seen) == n


def _edges_erdos_renyi(n, p, seed, tries=100):
  rng = np.random.RandomState(seed)
  upper = np.triu_indices(n, 1)
  for _ in range(tries):
    keep = rng.uniform(size=len(upper[0])) < p
    pairs = list(zip(upper[0][keep].tolist(), upper[1][keep].tolist()))
    if _connected(n, pairs):
      return pairs
  raise ArgumentError("erdos_renyi_p",
                      f"{p} gave a disconnected graph over {n} sites in {tries} draws; raise it "
                    f"above ln(S)/S = {np.log(n) / n:.3f}")


def metropolis_hastings(num_sites: int, pairs) -> tuple[np.ndarray, ...]:
  """(receivers, senders, edge_weights, self_weights) of the undirected edge set `pairs`."""
  undirected = sorted({(min(i, j), max(i, j)) for i, j in pairs if i != j})
  degree = np.zeros(num_sites, np.int64)
  for i, j in undirected:
    degree[i] += 1
    degree[j] += 1
  receivers, senders, weights = [], [], []
  for i, j in undirected:
    w = 1.0 / (1.0 + max(degree[i], degree[j]))
    receivers += [i, j]
    senders += [j, i]
    weights += [w, w]
  receivers = np.asarray(receivers, np.int32)
  senders = np.asarray(senders, np.int32)
  weights = np.asarray(weights, np.float64)
  self_weights = 1.0 - np.bincount(receivers, weights=weights, minlength=num_sites)
  return receivers, senders, weights, self_weights


def build(name: str, num_sites: int, erdos_renyi_p: float = 0.3, seed: int = 0) -> Topology:
  """The graph `name` (one of TOPOLOGIES) over `num_sites` sites with its MH weights."""
  if name not in TOPOLOGIES:
    raise ArgumentError("topology", f"unknown '{name}'; allowed: {', '.join(TOPOLOGIES)}")
  if name == "erdos_renyi":
    pairs = _edges_erdos_renyi(num_sites, erdos_renyi_p, seed)
  else:
    pairs = {"ring": _edges_ring, "torus": _edges_torus, "exponential": _edges_exponential,
             "complete": _edges_complete, "star": _edges_star}[name](num_sites)
  return Topology(name, num_sites, *metropolis_hastings(num_sites, pairs))


def from_config(config) -> Topology:
  """The graph of `algorithm.topology` over `data.num_sites` (Erdos-Renyi seeded by `seed`)."""
  a = config.algorithm
  with config_keys("algorithm"):
    return build(a.topology, config.data.num_sites, a.erdos_renyi_p, config.seed)


def spectral_gap(topology: Topology, lazy: bool = False) -> float:
  """1 - max(|lambda_2|, |lambda_S|) of W, or of (I + W) / 2 when `lazy`.

  The second-largest eigenvalue modulus is the largest |eigenvalue| of W on the subspace
  orthogonal to the consensus vector 1; consensus error shrinks by that factor per gossip.
  """
  n = topology.num_sites
  if n == 1:
    return 1.0
  if n <= _DENSE_EIG_MAX_SITES:
    eig = np.linalg.eigvalsh(topology.mixing_matrix())  # ascending; eig[-1] = 1
    if lazy:
      eig = (1.0 + eig) / 2.0
    return float(1.0 - max(abs(eig[0]), abs(eig[-2])))
  w = sp.coo_matrix((topology.edge_weights, (topology.receivers, topology.senders)),
                    shape=(n, n)).tocsr()
  w = w + sp.diags(topology.self_weights)
  if lazy:
    w = (sp.identity(n) + w) / 2.0

  def off_consensus(v):
    v = v - v.mean()
    return w @ v - (w @ v).mean()

  op = spla.LinearOperator((n, n), matvec=off_consensus, dtype=np.float64)
  second = spla.eigsh(op, k=1, which="LM", return_eigenvectors=False, tol=1e-8)
  return float(1.0 - abs(second[0]))


def mix(topology: Topology, tree, lazy: bool = False):
  """W x for every leaf x [S, ...] of `tree` (or (I + W) x / 2 when `lazy`), inside jit.

  x_i <- W_ii x_i + sum_{j ~ i} W_ij x_j, via the edge list: O(E) gathers and a segment sum.
  """
  n = topology.num_sites
  if topology.name == "complete":
    mixed = jax.tree.map(lambda a: jnp.broadcast_to(a.mean(0, keepdims=True), a.shape), tree)
  else:
    receivers = jnp.asarray(topology.receivers)
    senders = jnp.asarray(topology.senders)

    def mix_leaf(a):
      shape = (-1,) + (1,) * (a.ndim - 1)
      w_edge = jnp.asarray(topology.edge_weights, a.dtype).reshape(shape)
      w_self = jnp.asarray(topology.self_weights, a.dtype).reshape(shape)
      incoming = jax.ops.segment_sum(w_edge * a[senders], receivers, num_segments=n,
                                     indices_are_sorted=False)
      return w_self * a + incoming

    mixed = jax.tree.map(mix_leaf, tree)
  if lazy:
    mixed = jax.tree.map(lambda a, m: 0.5 * (a + m), tree, mixed)
  return mixed


def describe(topology: Topology, lazy: bool = False) -> str:
  """One line for the log: edges, degrees and spectral gap."""
  d = topology.degrees
  gap = spectral_gap(topology, lazy)
  which = "(I + W) / 2" if lazy else "W"
  return (f"topology {topology.name} over {topology.num_sites} sites: "
          f"{topology.messages_per_gossip // 2} edges, degree {d.min()}-{d.max()}, "
          f"Metropolis-Hastings mixing {which}, spectral gap {gap:.4g}")


def validate(config) -> None:
  """algorithm.topology and algorithm.erdos_renyi_p (RandCom, D-SGD)."""
  a = config.algorithm
  if a.topology not in TOPOLOGIES:
    raise ConfigError("algorithm.topology", f"unknown '{a.topology}'; allowed: "
                      f"{', '.join(TOPOLOGIES)}")
  if not 0 < a.erdos_renyi_p <= 1:
    raise ConfigError("algorithm.erdos_renyi_p", f"must be in (0, 1], got {a.erdos_renyi_p}")
