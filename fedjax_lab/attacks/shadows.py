"""Shadow models as a vmapped axis: who trains on what (membership tables), the trainer that
runs the lab's own round for K models in one compiled program, and the models' scores."""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import sharding
from fedjax_lab.attacks.lira import ATTACKS, leave_one_out, logit_confidence, neg_loss
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.experiment import Experiment


def one_device_experiment(config):
  """An Experiment on one device: the shadow trainer shards the model axis, not the sites."""
  return Experiment(config, mesh=sharding.make_mesh(jax.devices()[:1]))


def random_subsets(rng: np.random.Generator, n_pool: int, num_models: int,
                   n_in: int | None = None, strata=None) -> np.ndarray:
  """[num_models, n_pool] bool: each row marks a uniformly random subset of n_in (default
  half the pool); with `strata` (e.g. labels) half of every stratum instead."""
  if strata is not None:
    strata = np.asarray(strata)
    mask = np.zeros((num_models, n_pool), bool)
    for v in np.unique(strata):
      idx = np.flatnonzero(strata == v)
      mask[:, idx] = random_subsets(rng, len(idx), num_models)
    return mask
  n_in = n_pool // 2 if n_in is None else n_in
  if not 0 < n_in < n_pool:
    raise ValueError(f"n_in must be in (0, {n_pool}), got {n_in}")
  keys = rng.random((num_models, n_pool))
  return keys < np.sort(keys, axis=1)[:, n_in:n_in + 1]


def site_tables(mask: np.ndarray, site_size: int, rng: np.random.Generator,
                pool_rows: np.ndarray | None = None):
  """Every model's included pool examples in random order, cut into sites of `site_size`.
  mask [K, N] (same count per row) -> (idx [K, S, site_size] int32 rows, count [K, S])."""
  rows = np.arange(mask.shape[1]) if pool_rows is None else np.asarray(pool_rows)
  counts = mask.sum(1)
  if np.any(counts != counts[0]):
    raise ValueError("every model must include the same number of examples")
  n = int(counts[0])
  s = -(-n // site_size)
  idx = np.zeros((mask.shape[0], s, site_size), np.int32)
  count = np.zeros((mask.shape[0], s), np.int32)
  for k in range(mask.shape[0]):
    chosen = rng.permutation(rows[mask[k]])
    for j in range(s):
      part = chosen[j * site_size:(j + 1) * site_size]
      idx[k, j, :len(part)], count[k, j] = part, len(part)
  return idx, count


def tables_from_sites(site_mask: np.ndarray, sites: list) -> tuple[np.ndarray, np.ndarray]:
  """Site-level membership: model k trains on the sites site_mask[k] marks (same count per
  row); sites[j] is the rows of pool site j. -> (idx [K, S, n_max], count [K, S])."""
  n_max = max(len(s) for s in sites)
  chosen = [np.flatnonzero(m) for m in site_mask]
  idx = np.zeros((len(chosen), len(chosen[0]), n_max), np.int32)
  count = np.zeros(idx.shape[:2], np.int32)
  for k, c in enumerate(chosen):
    for j, site in enumerate(c):
      idx[k, j, :len(sites[site])], count[k, j] = sites[site], len(sites[site])
  return idx, count


def model_mesh(num_models: int):
  """A 1-D mesh over the most devices (<= all) that divide num_models."""
  devices = jax.devices()
  n = max(d for d in range(1, len(devices) + 1) if num_models % d == 0)
  return sharding.make_mesh(devices[:n])


class ShadowTrainer:
  """Trains K models with the lab's round: `train(idx, count, seeds)` -> params stacked [K, ...].

  `experiment` supplies round_fn, model and the algorithm's state; build it with a one-device
  mesh (`sharding.make_mesh(jax.devices()[:1])`) so the round's own site sharding stays out
  of the way and the model axis is what gets sharded. Compiled once per (shapes, rounds).
  """

  def __init__(self, experiment, rounds: int):
    if experiment.model.has_state:
      raise ValueError("models with BatchNorm statistics are not supported by the attack; "
                       "use model.norm=none or group")
    self.exp, self.rounds = experiment, rounds
    num_classes = experiment.data.num_classes

    def run(state, idx, count, sampling_key, client_key, x, y):
      data = FederatedData(x=x, y=y, idx=idx, count=count, num_classes=num_classes)

      def body(s, _):
        s, metrics = experiment.round_fn(s, data, sampling_key, client_key)
        return s, metrics.train_loss

      state, losses = jax.lax.scan(body, state, None, length=rounds)
      return state.params, losses

    self._one = jax.jit(run)
    self._many = jax.jit(jax.vmap(run, in_axes=(0, 0, 0, 0, 0, None, None)))

  def init_states(self, seeds, init_params=None):
    exp = self.exp
    if init_params is None:
      def init(seed):
        params, ms = exp.model.init(jax.random.key(seed), exp.train.x[:2])
        return exp.algorithm.init(params, ms)
      return jax.vmap(init)(jnp.asarray(seeds))
    state = exp.algorithm.init(jax.tree.map(jnp.asarray, init_params), {})
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (len(seeds), *jnp.shape(a))), state)

  @staticmethod
  def keys(seeds):
    seeds = jnp.asarray(seeds)
    root = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(0x5AD0), s))(seeds)
    return (jax.vmap(lambda k: jax.random.fold_in(k, 1))(root),
            jax.vmap(lambda k: jax.random.fold_in(k, 2))(root))

  def train(self, x, y, idx, count, seeds, init_params=None, vmapped: bool = True, mesh=None):
    """x [N, ...], y [N] the pool; idx [K, S, n], count [K, S] each model's sites; seeds [K]
    the models' init and training randomness (init_params: one start shared by all)."""
    seeds = np.asarray(seeds)
    if idx.shape[0] != len(seeds) or count.shape != idx.shape[:2]:
      raise ValueError(f"idx [K, S, n], count [K, S] and seeds [K] disagree: {idx.shape}, "
                       f"{count.shape}, {seeds.shape}")
    states = self.init_states(seeds, init_params)
    ks, kc = self.keys(seeds)
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    if not vmapped:
      one_dev = jax.devices()[0]
      out = [self._one(*jax.device_put((jax.tree.map(lambda a: a[k], states), idx[k], count[k],
                                        ks[k], kc[k], x, y), one_dev)) for k in range(len(seeds))]
      return jax.tree.map(lambda *a: jnp.stack(a), *[o[0] for o in out]), \
          jnp.stack([o[1] for o in out])
    mesh = mesh or model_mesh(len(seeds))
    per_model = sharding.put_sites((states, jnp.asarray(idx), jnp.asarray(count), ks, kc), mesh)
    shared = sharding.put_replicated((jnp.asarray(x), jnp.asarray(y)), mesh)
    return self._many(*per_model, *shared)


def model_scores(model, params, x, y, batch_models: int = 64):
  """(phi, -loss), each [K, N], of stacked params [K, ...] on x [N, ...], y [N]."""
  @jax.jit
  def f(p, x, y):
    logits = jax.vmap(lambda q: model.apply(q, {}, x, False)[0])(p)
    return logit_confidence(logits, y), neg_loss(logits, y)
  k = jax.tree.leaves(params)[0].shape[0]
  parts = [f(jax.tree.map(lambda a: a[i:i + batch_models], params), x, y)
           for i in range(0, k, batch_models)]
  return (np.concatenate([np.asarray(p[0]) for p in parts]),
          np.concatenate([np.asarray(p[1]) for p in parts]))


def run_attacks(phi, neg_losses, in_mask, num_targets=None, target=None):
  """All attacks. Leave-one-out over the models, or with `target` = (phi [N], neg_loss [N],
  labels [N]) an external target attacked with every model as a shadow.
  -> {attack: (scores, labels)}."""
  out = {}
  for name, attack in ATTACKS.items():
    if target is None:
      out[name] = leave_one_out(phi, in_mask, attack, num_targets)
    else:
      out[name] = (attack(target[0], phi, in_mask), np.asarray(target[2], bool))
  if target is None:
    t = phi.shape[0] if num_targets is None else min(num_targets, phi.shape[0])
    out["loss"] = (np.asarray(neg_losses)[:t], np.asarray(in_mask, bool)[:t])
  else:
    out["loss"] = (np.asarray(target[1]), np.asarray(target[2], bool))
  return out
