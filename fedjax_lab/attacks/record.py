"""The update a site sent, for attack studies: recomputed outside the jitted round.

`attack.record_sites` / `attack.record_rounds` (off by default) make `Experiment.run` keep, for
each listed round r (the `round` of metrics.jsonl, 1-based) and each listed site in that
round's cohort (site -1: every site of it), what the server received from it:
WORKDIR/attack/round<r>_site<s>.msgpack. This is the private data of a site, in the clear:
anyone who reads the workdir can attack it.

Rather than threading a recording output through the vmapped, sharded round, the site's
update is recomputed from the state before the round with the round's own keys
(round.make_round: round_rng = fold_in(client_rng, t), site key = fold_in(round_rng, site);
site-level DP's clipping and noise share by the round's own chain members, so it is the
update the round used (tests/test_inversion.py checks it against the round).
"""

import os

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import aggregators
from fedjax_lab import keys as lab_keys
from fedjax_lab.privacy import randomness
from fedjax_lab.privacy.sampling import poisson_cohort

FOLDER = "attack"


def wants(config, round_number: int) -> bool:
  """Whether round `round_number` (1-based) records anything."""
  a = config.get("attack")
  return bool(a and a.record_sites and round_number in tuple(a.record_rounds))


def cohort(exp, t: int):
  """(cohort ids [K], in_cohort mask [K]) of round t (0-based), as round.make_round draws them."""
  rng = jax.random.fold_in(exp.keys["sampling"], t)
  cfg = exp.config
  if cfg.dp.level != "site":
    ids = lab_keys.sample_cohort(rng, exp.data.num_sites, cfg.cohort_size)
    return np.asarray(ids), np.ones(ids.shape, np.float32)
  ids, mask, _ = poisson_cohort(rng, exp.data.num_sites, cfg.cohort_size / exp.data.num_sites,
                                exp.privacy.slots)
  return np.asarray(ids), np.asarray(mask)


def site_update(exp, state, t: int, site: int) -> dict:
  """What site `site` sent in round t (0-based) from server state `state` (before the round).

  Returns a dict of NumPy trees: delta (clipped and noised under site-level DP, before the
  division by the cohort size), model_state (the site's BatchNorm statistics), the global
  params / model_state it started from, the site key's data, its rows of the training data
  (for measuring leakage, never for the attack) and in_cohort.
  """
  cfg = exp.config
  if cfg.algorithm.name not in ("fedavg", "fedprox") or cfg.rounds_per_step != 1:
    raise ValueError("recording needs algorithm fedavg/fedprox and rounds_per_step=1")
  ids, mask = cohort(exp, t)
  present = [i for i, (s, m) in enumerate(zip(ids, mask)) if s == site and m > 0]
  rng = lab_keys.site_key(exp.keys["client"], t, site)
  data = exp.data
  count = int(data.count[site])
  ms = state.model_state
  if exp.fedbn and state.model_state:
    ms = jax.tree.map(lambda a: a[site], state.site_model_state)
  out = jax.jit(exp.client_update)(state.params, ms, data.idx[site], jnp.int32(count), rng, data)
  delta = out.delta
  if cfg.dp.level == "site":
    delta = _through_chain(exp, state, t, site, ids, mask, delta)
  to_np = lambda tree: jax.tree.map(np.asarray, tree)
  return {"round": t + 1, "site": site, "in_cohort": bool(present),
          "delta": to_np(delta), "model_state": to_np(out.model_state),
          "global_params": to_np(state.params), "global_model_state": to_np(ms),
          # A ChaCha20 key under dp.randomness=secret (8 words), threefry (2) otherwise.
          "rng": np.asarray(jax.random.key_data(rng)), "rng_impl": randomness.impl_name(rng),
          "rows": np.asarray(data.idx[site, :count]), "count": count}


def _through_chain(exp, state, t: int, site: int, ids, mask, delta):
  """The site's update through the round's own chain members up to the division by the
  cohort size (aggregators.site_dp_members: clipping to C or the state's C_t, its noise
  share), with the round's broadcast, so the record is what the round's sum received."""
  site_dp = exp._site_dp()  # pylint: disable=protected-access
  if site_dp.cohort_groups:
    raise ValueError("recording under matrix-factorization noise is not implemented")
  members = aggregators.site_dp_members(
      site_dp.clip_norm, site_dp.noise_multiplier, site_dp.coordinated, exp.config.cohort_size,
      site_dp.adaptive, site_dp.grid, site_dp.max_cohort)[:-1]
  chain = aggregators.chain(*members)
  rnd = aggregators.RoundInfo(t=jnp.int32(t), client_rng=exp.keys["client"],
                              cohort=jnp.asarray(ids), in_cohort=jnp.asarray(mask),
                              num_in=jnp.asarray(mask).sum())
  shared = chain.broadcast(state.aggregator_state, rnd, {})
  info = aggregators.SiteInfo(site=jnp.int32(site), weight=jnp.float32(1.0),
                              present=jnp.float32(1.0))
  return chain.site(delta, info, shared)[0]


def save(exp, state_before, round_number: int, workdir: str) -> list:
  """Writes every listed site of round `round_number` that was in its cohort; their paths."""
  paths = []
  os.makedirs(os.path.join(workdir, FOLDER), exist_ok=True)
  sites = list(exp.config.attack.record_sites)
  if -1 in sites:  # -1: every site of the round's cohort
    ids, mask = cohort(exp, round_number - 1)
    sites = sorted({int(s) for s in sites if s != -1} | {int(s) for s, m in zip(ids, mask) if m})
  for site in sites:
    rec = site_update(exp, state_before, round_number - 1, int(site))
    if not rec["in_cohort"]:
      continue
    path = os.path.join(workdir, FOLDER, f"round{round_number}_site{int(site)}.msgpack")
    with open(path, "wb") as f:
      f.write(flax.serialization.msgpack_serialize(rec))
    paths.append(path)
  return paths


def load(path: str) -> dict:
  with open(path, "rb") as f:
    return flax.serialization.msgpack_restore(f.read())


def list_records(workdir: str) -> list:
  folder = os.path.join(workdir, FOLDER)
  if not os.path.isdir(folder):
    return []
  return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".msgpack"))
