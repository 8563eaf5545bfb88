"""Communication graphs: structure, Metropolis-Hastings weights, spectral gaps, mixing."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedjax_lab.algorithms import topology
from fedjax_lab.errors import ArgumentError, ConfigError

GRAPHS = [("ring", 8), ("ring", 2), ("ring", 3), ("torus", 16), ("torus", 12), ("torus", 6),
          ("exponential", 10), ("exponential", 16), ("erdos_renyi", 12), ("complete", 7),
          ("star", 9)]


def _neighbours(topo, i):
  return set(topo.senders[topo.receivers == i].tolist())


def _reference_mh(adjacency):
  """Metropolis-Hastings weights from a 0/1 adjacency matrix, by the textbook formula."""
  n = len(adjacency)
  degree = adjacency.sum(1)
  w = np.zeros((n, n))
  for i, j in itertools.product(range(n), range(n)):
    if i != j and adjacency[i, j]:
      w[i, j] = 1.0 / (1.0 + max(degree[i], degree[j]))
  w[np.diag_indices(n)] = 1.0 - w.sum(1)
  return w


@pytest.mark.parametrize("name,n", GRAPHS)
def test_mixing_matrix_is_symmetric_doubly_stochastic_metropolis_hastings(name, n):
  topo = topology.build(name, n, erdos_renyi_p=0.4, seed=3)
  w = topo.mixing_matrix()
  np.testing.assert_allclose(w, w.T, atol=1e-7)
  np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-6)
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
  assert (w >= 0).all()
  adjacency = (w > 0) & ~np.eye(n, dtype=bool)
  np.testing.assert_allclose(w, _reference_mh(adjacency), atol=1e-7)
  assert topo.messages_per_gossip == adjacency.sum()  # each site to each neighbour


@pytest.mark.parametrize("name,n", GRAPHS)
def test_spectral_gap_matches_numpy(name, n):
  topo = topology.build(name, n, erdos_renyi_p=0.4, seed=3)
  w = topo.mixing_matrix()
  moduli = np.sort(np.abs(np.linalg.eigvals(w)))
  assert moduli[-1] == pytest.approx(1.0, abs=1e-6)
  assert topology.spectral_gap(topo) == pytest.approx(1.0 - moduli[-2], abs=1e-6)
  lazy = np.sort(np.abs(np.linalg.eigvals((np.eye(n) + w) / 2)))
  assert topology.spectral_gap(topo, lazy=True) == pytest.approx(1.0 - lazy[-2], abs=1e-6)
  assert topology.spectral_gap(topo) > 0  # connected


def test_known_spectral_gaps():
  # Ring with MH weights 1/3: eigenvalues (1 + 2 cos(2 pi k / n)) / 3.
  for n in (5, 8, 13):
    want = 1.0 - (1.0 + 2.0 * np.cos(2 * np.pi / n)) / 3.0
    assert topology.spectral_gap(topology.build("ring", n)) == pytest.approx(want, abs=1e-9)
  # Complete graph: W = 11^T / n, every other eigenvalue 0.
  assert topology.spectral_gap(topology.build("complete", 6)) == pytest.approx(1.0, abs=1e-9)
  # 4 x 4 torus, weights 1/5: W = (I + A) / 5, A's eigenvalues 2cos(a) + 2cos(b) in [-4, 4].
  assert topology.spectral_gap(topology.build("torus", 16)) == pytest.approx(0.4, abs=1e-9)


def test_sparse_spectral_gap_path_matches_dense(monkeypatch):
  topo = topology.build("exponential", 40)
  dense, dense_lazy = topology.spectral_gap(topo), topology.spectral_gap(topo, lazy=True)
  monkeypatch.setattr(topology, "_DENSE_EIG_MAX_SITES", 10)
  assert topology.spectral_gap(topo) == pytest.approx(dense, abs=1e-6)
  assert topology.spectral_gap(topo, lazy=True) == pytest.approx(dense_lazy, abs=1e-6)


def test_graph_structure():
  ring = topology.build("ring", 8)
  assert _neighbours(ring, 0) == {1, 7} and set(ring.degrees) == {2}
  torus = topology.build("torus", 16)  # 4 x 4, site = 4 * row + col
  assert _neighbours(torus, 0) == {1, 3, 4, 12} and set(torus.degrees) == {4}
  assert set(topology.build("torus", 12).degrees) == {4}  # 3 x 4
  assert set(topology.build("torus", 6).degrees) == {3}   # 2 x 3: up = down
  expo = topology.build("exponential", 10)  # hops 1, 2, 4, 8 both ways (mod 10)
  assert _neighbours(expo, 0) == {1, 2, 4, 6, 8, 9}
  star = topology.build("star", 9)
  assert star.degrees[0] == 8 and set(star.degrees[1:]) == {1}
  assert set(topology.build("complete", 7).degrees) == {6}
  er = topology.build("erdos_renyi", 30, erdos_renyi_p=0.3, seed=1)
  again = topology.build("erdos_renyi", 30, erdos_renyi_p=0.3, seed=1)
  np.testing.assert_array_equal(er.senders, again.senders)  # seeded
  edges = er.messages_per_gossip // 2
  mean, std = 0.3 * 435, np.sqrt(435 * 0.3 * 0.7)  # 435 = 30 choose 2 pairs
  assert abs(edges - mean) < 4 * std


def test_bad_graphs_name_the_argument_and_from_a_config_the_key():
  for args, kw, argument in ((("torus", 13), {}, "topology"),
                             (("erdos_renyi", 50), {"erdos_renyi_p": 0.01}, "erdos_renyi_p"),
                             (("hypercube", 8), {}, "topology")):
    with pytest.raises(ArgumentError) as e:
      topology.build(*args, **kw)
    assert e.value.argument == argument
  config = ml_collections.ConfigDict({"seed": 0, "data": {"num_sites": 13},
                                      "algorithm": {"topology": "torus", "erdos_renyi_p": 0.3}})
  with pytest.raises(ConfigError) as e:
    topology.from_config(config)
  assert e.value.key == "algorithm.topology"


@pytest.mark.parametrize("name,n", [("ring", 8), ("torus", 12), ("exponential", 10),
                                    ("complete", 7), ("star", 9), ("erdos_renyi", 12)])
@pytest.mark.parametrize("lazy", [False, True])
def test_neighbour_list_mixing_equals_dense_matmul(name, n, lazy):
  topo = topology.build(name, n, erdos_renyi_p=0.4, seed=3)
  rng = np.random.RandomState(0)
  tree = {"kernel": rng.randn(n, 3, 2).astype(np.float32), "bias": rng.randn(n).astype(np.float32)}
  w = topo.mixing_matrix()
  if lazy:
    w = (np.eye(n) + w) / 2
  got = jax.jit(lambda t: topology.mix(topo, t, lazy=lazy))(
      jax.tree.map(jnp.asarray, tree))
  np.testing.assert_allclose(got["kernel"], np.einsum("ij,jab->iab", w, tree["kernel"]),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["bias"], w @ tree["bias"], rtol=1e-5, atol=1e-6)
