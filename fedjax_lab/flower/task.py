"""The lab's task, as the Flower apps see it: built from a lab config, no Flower imports.

Both apps build the lab's `Experiment` from the same config (config file + overrides), so the
model, its initialisation, the partition, the client update and the server optimizer are the
lab's own. A site trains on a FederatedData holding ONLY its own examples: the lab's client
update depends on a site's examples alone (client.py), so the result equals the lab's
simulation, which the loopback test checks. The keys are the lab's: site s in round t trains
with fold_in(fold_in(client_key, t), s), as algorithms/fedavg.py derives them.

Limits: FedAvg/FedProx without DP and with every site in every round (cohort_size =
data.num_sites = number of SuperNodes); anything else is a ConfigError naming the key.
"""

import ast
import functools
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab import aggregators, evaluation_robustness, runs, sweep
from fedjax_lab import keys as lab_keys
from fedjax_lab.algorithms import round as lab_round
from fedjax_lab.data import federated
from fedjax_lab.errors import ConfigError
from fedjax_lab.experiment import Experiment


def load_config(spec: str, overrides: str = ""):
  """The lab config of 'configs/x.py[:arg]' with 'key=value key=value' overrides applied."""
  config = runs.load_config_file(spec)
  for item in shlex.split(overrides or ""):
    key, _, value = item.partition("=")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    sweep.set_key(config, key, value)
  return config


def check(config, num_supernodes: int | None = None) -> None:
  if config.algorithm.name not in ("fedavg", "fedprox"):
    raise ConfigError("algorithm.name", f"the Flower apps run fedavg or fedprox, got "
                      f"'{config.algorithm.name}'")
  if config.dp.level != "none":
    raise ConfigError("dp.level", "the Flower apps run without DP; allowed: none")
  if config.cohort_size != config.data.num_sites:
    raise ConfigError("cohort_size", f"the Flower apps train every site every round: set "
                      f"cohort_size = data.num_sites = {config.data.num_sites}")
  if num_supernodes is not None and num_supernodes != config.data.num_sites:
    raise ConfigError("data.num_sites", f"{config.data.num_sites} sites but {num_supernodes} "
                      "SuperNodes; start one SuperNode per site")
  if config.attack.name != "none":
    raise ConfigError("attack.name", "the lab's Byzantine sites live in its simulated round; "
                      "the Flower apps run honest sites; set attack.name=none")
  if config.algorithm.batch_stats == "local" or config.model.norm == "batch":
    raise ConfigError("model.norm", "the Flower apps send parameters only; allowed: none, "
                      "group")


def build(config):
  check(config)
  config.log.progress = config.log.tensorboard = False
  return Experiment(config)


def leaves(tree) -> list[np.ndarray]:
  return [np.asarray(a, np.float32) for a in jax.tree.leaves(tree)]


def unflatten(like, arrays):
  return jax.tree.unflatten(jax.tree.structure(like), [jnp.asarray(a) for a in arrays])


class SiteClient:
  """Site `site` of the config's partition, holding only its own examples."""

  def __init__(self, exp, site: int):
    if not 0 <= site < exp.data.num_sites:
      raise ConfigError("partition-id", f"site {site} outside 0..{exp.data.num_sites - 1}")
    self.exp, self.site = exp, site
    rows = np.asarray(exp.sites[site])
    self.count = len(rows)
    self.data = federated.from_partition(exp.train.x[rows], exp.train.y[rows],
                                         [np.arange(self.count)], exp.train.num_classes)
    self._update = jax.jit(exp.client_update)

  def train(self, params, round_index: int):
    """(delta leaves, mean local loss): the lab's client update of this site in this round."""
    rng = lab_keys.site_key(self.exp.keys["client"], round_index, self.site)
    out = self._update(params, {}, self.data.idx[0], self.data.count[0], rng, self.data)
    return leaves(out.delta), float(out.train_loss)


class Server:
  """The lab's server: initial model, the lab's aggregator chain over the deltas (the
  example-weighted mean, or aggregator.robust's reducer), server optimizer."""

  def __init__(self, exp):
    self.exp = exp
    state = exp.init_state()
    self.params = jax.device_get(state.params)
    self.opt_state = exp.server_tx.init(self.params)
    self.aggregator = lab_round.config_aggregator(exp.config, None, self.params)
    self.agg_state = self.aggregator.init()
    self.round = 0

  def aggregate(self, deltas: list[list[np.ndarray]], counts: list[int]):
    """The chain's site transforms, then the sum in site order (or its reduce step on the
    stacked deltas), then its server steps: what round.make_round does on device."""
    n = len(deltas)
    weights = np.asarray(counts, np.float32) / np.float32(sum(counts))
    rnd = aggregators.RoundInfo(t=jnp.int32(self.round), client_rng=self.exp.keys["client"],
                                cohort=jnp.arange(n, dtype=jnp.int32),
                                in_cohort=jnp.ones((n,), jnp.float32), num_in=jnp.float32(n))
    shared = self.aggregator.broadcast(self.agg_state, rnd, {})
    sent, stats = zip(*[self.aggregator.site(
        unflatten(self.params, d), aggregators.SiteInfo(site=jnp.int32(k), weight=weights[k],
                                                        present=jnp.float32(1.0)), shared)
        for k, d in enumerate(deltas)])
    stats = jax.tree.map(lambda *a: jnp.stack(a), *stats) if stats[0] else {}
    if aggregators.stacked(self.aggregator):
      total = aggregators.reduce_stacked(
          self.aggregator, jax.tree.map(lambda *a: jnp.stack(a), *sent), jnp.asarray(weights),
          rnd.in_cohort, self.agg_state, rnd, shared)
    else:
      total = functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), sent)
    total, self.agg_state, _ = self.aggregator.server(total, self.agg_state, rnd, shared, stats)
    return total

  def step(self, deltas: list[list[np.ndarray]], counts: list[int]) -> None:
    mean_delta = self.aggregate(deltas, counts)
    self.round += 1
    updates, self.opt_state = self.exp.server_tx.update(
        jax.tree.map(jnp.negative, mean_delta), self.opt_state, self.params)
    self.params = optax.apply_updates(self.params, updates)

  def evaluate(self) -> dict:
    state = self.exp.init_state()._replace(params=self.params)
    result = self.exp.evaluate(state)
    probs = evaluation_robustness.make_predictor(self.exp.model, 2048)(
        self.params, state.model_state, np.asarray(self.exp.test.x, np.float32))
    q = evaluation_robustness.quality(np.asarray(self.exp.test.y), probs, self.exp.site_hist, 0)
    return {"test_accuracy": result.accuracy, "test_auc": q["test_auc"],
            "test_macro_f1": q["test_macro_f1"]}
