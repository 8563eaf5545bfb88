"""The generic federated round every algorithm builds on: make_round and its parts.

One round, as in the papers' algorithm box (McMahan et al. 2017):
  sample a cohort S_t of K sites
  for each site k in S_t in parallel (jax.vmap):  Δ_k = ClientUpdate(w_t, data_k)
  Δ_t = Σ_k p_k Δ_k  with p_k ∝ n_k (or uniform)
  w_{t+1} = ServerOpt(w_t, -Δ_t)
The round is built from the three seams (docs/design.md): the client update (client.py),
the aggregator chain (aggregators.py: `weighted` without DP; under site-level DP (SiteDP)
Δ_t = (Σ_k clip(Δ_k, C_t) + noise) / expected cohort size, with adaptive clipping's C_t) and
the server optax step (`server_step`). FedAvg (fedavg.py) is this round as it is; other
algorithms reuse it with their own aggregator (FedNova) or their own per-site state (FedBN's
statistics, local parameters), or take its parts (server_step, gather_sites / scatter_sites).
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab import aggregators, algorithms, sharding
from fedjax_lab import keys as lab_keys
from fedjax_lab.keys import sample_cohort  # noqa: F401  (API: scaffold, tests)
from fedjax_lab.attacks import canaries as canaries_lib
from fedjax_lab.aggregators import AdaptiveClip, clip_by_global_norm  # noqa: F401 (API)
from fedjax_lab.algorithms import RoundMetrics, round_metrics  # noqa: F401 (API)
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.privacy.sampling import poisson_cohort
from fedjax_lab.secagg import round as secagg_round
from fedjax_lab import robust
from fedjax_lab.attacks import byzantine

# fold_in tag (into the round's client key, beside the site ids) of the public minibatch a
# curvature server optimizer takes its obj_fn on.
_SERVER_PUBLIC = 0xFFFFFFFD


class ServerState(NamedTuple):
  params: Any            # the global model
  model_state: Any       # global BatchNorm statistics ({} if none)
  opt_state: Any         # the server optimizer's state
  site_model_state: Any  # what each site keeps (FedBN statistics), leaves [sites, ...]; else {}
  round: jax.Array       # int32 rounds completed
  # The aggregator chain's state (aggregators.chain): adaptive clipping's C_t (the next
  # round's clip norm, float32), matrix-factorization noise's state, centered clipping's
  # center; {} for a stateless chain.
  aggregator_state: Any
  # The parameters each site keeps (algorithm.local_params): {path: [sites, ...]}; else {}.
  site_params: Any = {}
  # Example-level matrix-factorization noise: each site's correlated-noise state
  # (mf_noise.NoiseState, leaves [sites, ...]; its `round` counts the site's local steps so
  # far, which also picks its next cyclic batch); else {}. Secret, like the noise keys.
  site_noise: Any = {}


class SiteDP(NamedTuple):
  """Site-level DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
  Language Models"): Poisson cohorts at rate q = cohort_size / num_sites, each site update
  clipped to clip_norm, Gaussian noise on the sum, divided by the expected cohort size
  (the chain `aggregators.site_dp`).

  noise "parallel": every site adds N(0, (sigma C)^2) and the server tops the sum up to
  max_cohort such shares, so its noise does not tell the round's cohort size;
  "coordinated" (Dopamine): every site adds N(0, (sigma C)^2 / n) for the n sites of the
  round, so the secure sum carries exactly (sigma C)^2. The accountant uses sigma either way
  (parallel only adds more noise). A round
  whose Poisson cohort is empty still releases N(0, (sigma C)^2): the server adds it (and
  the count's noise), because the accountant composes that release every round.

  With `adaptive` set, C is C_t from the server state (clip_norm is only C_0) and
  noise_multiplier is the update's share z_Δ of the accountant's sigma (adaptive_clipping.py).
  """
  clip_norm: float         # C, or C_0 with adaptive clipping
  noise_multiplier: float  # of the update: sigma, or z_Δ with adaptive clipping
  coordinated: bool
  max_cohort: int
  adaptive: AdaptiveClip | None = None
  # Secure aggregation's grid (clip_range, levels; privacy/secagg_delta.grid): an empty
  # round's server noise is rounded onto it, or it would tell the server the cohort was empty.
  grid: tuple[float, int] | None = None
  # Matrix-factorization noise (dp.mechanism tree / blt / banded / dense, privacy/mechanism.py):
  # cohorts cycle through `cohort_groups` fixed groups of sites (0: Poisson cohorts), and the
  # server adds the `correlated` noise (mf_noise.CorrelatedNoise) of parameters shaped `like`.
  cohort_groups: int = 0
  group_rate: float = 1.0  # each site of the round's group joins w.p. this (1: all of them)
  correlated: Any = None
  like: Any = None


def count_noise(count_rng, cohort, in_cohort, num_in, site_dp: SiteDP):
  """Σ_k ξ_k: the noise on adaptive clipping's count (aggregators.count_noise)."""
  return aggregators.count_noise(count_rng, cohort, in_cohort, num_in,
                                 site_dp.adaptive.count_stddev, site_dp.coordinated)


def make_aggregator(site_dp: SiteDP | None, cohort_size: int) -> aggregators.Aggregator:
  """The round's chain: the weighted mean, or site-level DP's clip, noise, / expected size."""
  if site_dp is None:
    return aggregators.weighted()
  if site_dp.cohort_groups:
    return aggregators.mf_site_dp(site_dp.clip_norm, site_dp.noise_multiplier,
                                  site_dp.correlated, site_dp.like, cohort_size)
  return aggregators.site_dp(site_dp.clip_norm, site_dp.noise_multiplier, site_dp.coordinated,
                             cohort_size, site_dp.adaptive, site_dp.grid, site_dp.max_cohort)


def config_aggregator(config, site_dp: SiteDP | None, like=None) -> aggregators.Aggregator:
  """The round's chain from the config: make_aggregator's, or the robust chain of
  aggregator.* (robust.defense), attacked by attack.name's Byzantine sites when set."""
  dim = (None if like is None
         else sum(int(np.prod(a.shape)) for a in jax.tree.leaves(like)))
  chain = robust.defense(config, dim)
  if config.attack.name != "none":
    return byzantine.attacked(config.attack.name, config.attack.num_sites, chain,
                              config.attack.scale)
  return make_aggregator(site_dp, config.cohort_size) if chain is None else chain


# fold_in tag of the one permutation that splits the sites into cyclic groups.
_GROUPS = 0xFFFFFFF0
# fold_in tag of each site's one permutation of its examples into cyclic batches (example-level
# matrix-factorization noise: privacy/sampling.cyclic_batch).
_BATCHES = 0xFFFFFFF1


def batch_permutation_keys(sampling_rng, cohort) -> jax.Array:
  """[cohort] keys of the sites' fixed batch permutations: from the sampling key (secret
  under dp.randomness=secret) and the site id only, so the same every round."""
  return lab_keys.site_keys(jax.random.fold_in(sampling_rng, _BATCHES), 0, cohort)


def cyclic_cohort(sampling_rng, t, num_sites: int, cohort_size: int, groups: int) -> jax.Array:
  """[cohort_size] site ids of round t's group (cohort_size = the group's size): the sites
  permuted once (from the sampling key, so secret under dp.randomness=secret) and cut into
  `groups` groups;
  round t trains group t mod groups, so a site takes part at most once every `groups` rounds
  (the min-separation the matrix-factorization accounting needs)."""
  order = jax.random.permutation(jax.random.fold_in(sampling_rng, _GROUPS), num_sites)
  start = (t % groups) * cohort_size
  return jax.lax.dynamic_slice(order, (start,), (cohort_size,)).astype(jnp.int32)


def param_path(path) -> str:
  """A parameter's name as algorithm.local_params matches it: 'Dense_1/kernel'."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def local_param_paths(params, patterns) -> tuple[str, ...]:
  """The paths of the parameters that stay at their site: those containing any pattern."""
  paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return tuple(p for p in paths if any(pat in p for pat in patterns))


def merge_local(params, local: dict):
  """The global parameters with the leaves named in `local` replaced by its values."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: local.get(param_path(path), leaf), params)


def init_server_state(params, model_state, server_tx, num_sites: int, fedbn: bool,
                      clip_norm: float | None = None,
                      aggregator: aggregators.Aggregator | None = None,
                      local_params: tuple[str, ...] = (),
                      site_noise: Any = None) -> ServerState:
  """`clip_norm`: C_0 under adaptive clipping (kept in the state, so it is checkpointed);
  or `aggregator`, whose init() is the state kept there. `local_params`: patterns of the
  parameters each site keeps (every site starts from the initial values). `site_noise`: the
  example-level correlated noise (mf_noise.CorrelatedNoise), one state per site."""
  site_state = {}
  if fedbn and model_state:
    site_state = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_sites, *a.shape)), model_state)
  agg_state = {} if clip_norm is None else jnp.asarray(clip_norm, jnp.float32)
  if aggregator is not None:
    agg_state = aggregator.init()
  site_params = {
      param_path(path): jnp.broadcast_to(leaf, (num_sites, *leaf.shape))
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
      if param_path(path) in local_param_paths(params, local_params)}
  noise_state = {}
  if site_noise is not None:
    noise_state = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_sites, *a.shape)),
                               site_noise.init(params))
  return ServerState(params=params, model_state=model_state, opt_state=server_tx.init(params),
                     site_model_state=site_state, round=jnp.zeros((), jnp.int32),
                     aggregator_state=agg_state, site_params=site_params,
                     site_noise=noise_state)


def server_step(server_tx: optax.GradientTransformationExtraArgs, mean_delta, opt_state,
                params, objective: Callable | None, model_state, round_rng,
                data: FederatedData):
  """x <- ServerOpt(x, -mean_delta); returns (params, opt_state).

  The mean site update is a pseudo-gradient, not the gradient of a loss the server holds, so
  a curvature server optimizer (esgd, adahessian, sophia) takes its Hessian-vector products of
  `objective` (client.make_public_objective): the loss of a minibatch of the PUBLIC
  calibration set at the global model, post-processing under any DP level. Without it
  (no curvature server optimizer) the update gets no obj_fn.
  """
  extra = {}
  if objective is not None:
    key = jax.random.fold_in(round_rng, _SERVER_PUBLIC)
    extra["obj_fn"] = objective(model_state, key, key, data)
  updates, opt_state = server_tx.update(jax.tree.map(jnp.negative, mean_delta), opt_state,
                                        params, **extra)
  return optax.apply_updates(params, updates), opt_state


def gather_sites(tree, cohort):
  """Leaves [sites, ...] -> [cohort, ...]: what the cohort's sites kept from earlier rounds."""
  return jax.tree.map(lambda a: a[cohort], tree)


def scatter_sites(tree, cohort, new):
  """Writes the cohort's rows of a per-site tree back (what each site keeps)."""
  return jax.tree.map(lambda all_, n: all_.at[cohort].set(n), tree, new)


def make_round(client_update: Callable, server_tx: optax.GradientTransformation, *,
               cohort_size: int, weighting: str = "examples", fedbn: bool = False,
               mesh=None, site_dp: SiteDP | None = None,
               min_sites_per_device: int = 16, sites_per_chunk: int = 0,
               server_objective: Callable | None = None,
               aggregator: aggregators.Aggregator | None = None,
               secure_sum: Callable | None = None, byzantine_sites: int = 0,
               flip_labels: bool = False, canaries=None) -> Callable:
  """Returns round_fn(state, data, sampling_rng, client_rng) -> (state, RoundMetrics).

  `client_update` is `client.make_client_update(...)`; the keys are the run's per-purpose
  roots: the round index and site id are folded in here, so a site's randomness never
  depends on the cohort order or the device it ran on. `server_objective`: see server_step.
  `sites_per_chunk`: see sharding.map_sum_sites. `aggregator`: the chain between the sites
  and the server (default `make_aggregator(site_dp, cohort_size)`).

  What a site keeps between rounds, one mechanism: the parameters in `state.site_params`
  (algorithm.local_params: each site trains the global model with its own copies of those
  leaves, keeps their new values and sends a zero update for them, so neither the sum nor
  DP nor secure aggregation ever carries them) and, with `fedbn`, its model state
  (BatchNorm statistics) in `site_model_state`; both gathered for the cohort before the
  local steps and written back after them (gather_sites / scatter_sites).

  `secure_sum` (a secagg.round.SecureSum): the sites' transformed updates are summed by the
  secure-aggregation protocol on the host instead of on the device. The round is then two
  jitted halves around that host step (`secure_round`), so it cannot be jitted or fused as a
  whole; an aborted round leaves the model as it was.

  A chain with a reducer or pre-aggregation (aggregators.stacked: robust aggregation,
  Byzantine attacks) keeps each site's update [slots, ...] and aggregates them by
  aggregators.reduce_stacked after the vmap, in the same jit; any other chain is summed on
  the fly as before. `byzantine_sites`: the first that many slots of every cohort are
  Byzantine (attacks/byzantine.py); `flip_labels`: they train on flipped labels
  (y -> num_classes - 1 - y), inside the vmap like any site.

  `canaries` (attacks/canaries.Canaries, audit.canaries > 0): the round's canary sites'
  updates, summed, join the sites' sum before the chain's server steps (noise, divisor).
  """
  if aggregator is None:
    aggregator = make_aggregator(site_dp, cohort_size)
  keep_updates = aggregators.stacked(aggregator)
  if keep_updates and secure_sum is not None:
    raise ValueError("make_round: a stacked reducer needs the individual updates, which the "
                     "secure sum hides")

  def sites(state: ServerState, data: FederatedData, sampling_rng, client_rng, as_rows: bool):
    """The round up to the sum: cohort, client updates, the chain's per-site transforms and
    the sum over the sites (or, `as_rows`, each site's contribution as one float32 row)."""
    t = state.round
    round_sampling_rng = jax.random.fold_in(sampling_rng, t)
    if site_dp is None:
      cohort = sample_cohort(round_sampling_rng, data.num_sites, cohort_size)
      in_cohort, cohort_overflow = jnp.ones(cohort.shape, jnp.float32), jnp.int32(0)
    elif site_dp.cohort_groups:
      cohort = cyclic_cohort(sampling_rng, t, data.num_sites, site_dp.max_cohort,
                             site_dp.cohort_groups)
      in_cohort, cohort_overflow = jnp.ones(cohort.shape, jnp.float32), jnp.int32(0)
      if site_dp.group_rate < 1:  # Poisson within the group: amplified banded MF's sampling
        coins = jax.random.uniform(jax.random.fold_in(round_sampling_rng, _GROUPS),
                                   cohort.shape)
        in_cohort = (coins < site_dp.group_rate).astype(jnp.float32)
    else:
      cohort, in_cohort, cohort_overflow = poisson_cohort(
          round_sampling_rng, data.num_sites, cohort_size / data.num_sites,
          site_dp.max_cohort)
    # Aggregation weights from the replicated counts: no cross-device sum for the normaliser.
    # Below min_sites_per_device a cross-device sum costs more than the split saves: every
    # device then runs the whole (replicated) cohort.
    split = sharding.mesh_if_worth_it(mesh, cohort.shape[0], min_sites_per_device)
    cohort_count = sharding.constrain_replicated(data.count[cohort], split)
    if weighting == "examples":
      weights = cohort_count.astype(jnp.float32) / cohort_count.sum()
    else:
      weights = jnp.full(cohort.shape, 1.0 / cohort.shape[0])
    num_in = in_cohort.sum()
    if site_dp is not None:
      # A padded slot of the Poisson cohort trains on no examples (count 0, see client.py),
      # not on the data of site 0 its id points to: its update is dropped anyway.
      cohort_count = jnp.where(in_cohort > 0, cohort_count, 0)
      weights = in_cohort / jnp.maximum(num_in, 1.0)
    site_idx, site_count = sharding.constrain_sites((data.idx[cohort], cohort_count), split)
    round_rng = jax.random.fold_in(client_rng, t)  # the server step's key
    site_rngs = lab_keys.site_keys(client_rng, t, cohort)
    if fedbn and state.model_state:
      site_ms, ms_axis = gather_sites(state.site_model_state, cohort), 0
    else:
      site_ms, ms_axis = state.model_state, None
    site_local = gather_sites(state.site_params, cohort)  # {} without local parameters
    # Example-level correlated noise: each cohort site's state and permutation key ({}: none).
    site_noise = state.site_noise
    if site_noise:
      site_noise = (batch_permutation_keys(sampling_rng, cohort), gather_sites(site_noise, cohort))

    rnd = aggregators.RoundInfo(t=t, client_rng=client_rng, cohort=cohort,
                                in_cohort=in_cohort, num_in=num_in)
    shared = aggregator.broadcast(state.aggregator_state, rnd, {})

    def site_fn(params, local, ms, idx, count, rng, weight, in_k, site, byz, noise, data):
      """One site: its update through the chain's site transforms, and its terms of the
      round's sums (sharding.map_sum_sites)."""
      if flip_labels:
        data = data.replace(y=jnp.where(byz, data.num_classes - 1 - data.y, data.y))
      kw = {"noise": noise} if noise else {}
      out = client_update(merge_local(params, local), ms, idx, count, rng, data, **kw)
      delta = out.delta
      if local:  # kept: the local leaves' new values; sent: zeros in their place
        flat = {param_path(p): d for p, d in jax.tree_util.tree_flatten_with_path(delta)[0]}
        local = {k: v + flat[k] for k, v in local.items()}
        delta = merge_local(delta, {k: jnp.zeros_like(v) for k, v in local.items()})
      info = aggregators.SiteInfo(site=site, weight=weight, present=in_k,
                                  steps=out.num_steps)
      update, stats = aggregator.site(delta, info, shared)
      scale = lambda tree, c: jax.tree.map(lambda a: c * a, tree)
      sent = {"delta": update, "model_state": scale(out.model_state, weight)}
      to_sum = {"loss": weight * out.train_loss, "overflow": out.dp_overflow}
      per_site = {"model_state": out.model_state if fedbn else {}, "stats": stats,
                  "local": local, "noise": out.noise_state if noise else {}}
      if as_rows:  # what the site sends, flat: the secure sum adds these on the host
        per_site["row"] = jax.flatten_util.ravel_pytree(sent)[0].astype(jnp.float32)
      elif keep_updates:
        per_site["update"] = sent.pop("delta")
        to_sum.update(sent)
      else:
        to_sum.update(sent)
      return to_sum, per_site

    byz = jnp.arange(cohort.shape[0]) < byzantine_sites
    sums, per_site = sharding.map_sum_sites(
        site_fn, (None, 0, ms_axis, 0, 0, 0, 0, 0, 0, 0, 0, None), split, sites_per_chunk)(
            state.params, site_local, site_ms, site_idx, site_count, site_rngs, weights,
            in_cohort, cohort, byz, site_noise, data)
    if keep_updates:
      sums["delta"] = aggregators.reduce_stacked(aggregator, per_site.pop("update"), weights,
                                                 in_cohort, state.aggregator_state, rnd, shared)
    ctx = dict(sums=sums, per_site=per_site, rnd=rnd, shared=shared, weights=weights,
               cohort_overflow=cohort_overflow, round_rng=round_rng)
    if canaries is not None:
      ctx["canaries"] = canaries_lib.round_sum(canaries, data.canary_directions,
                                                   sampling_rng, t)
    return ctx

  def finish(state: ServerState, data: FederatedData, ctx, sent_total, secagg_metrics=None):
    """The server's end: the chain's server steps (last to first), the server optimizer."""
    rnd, sums, per_site = ctx["rnd"], ctx["sums"], ctx["per_site"]
    total = sent_total["delta"]
    if canaries is not None:  # as if their rows were in the sum
      unravel = jax.flatten_util.ravel_pytree(total)[1]
      total = jax.tree.map(jnp.add, total, unravel(ctx["canaries"]))
    mean_delta, agg_state, agg_metrics = aggregator.server(
        total, state.aggregator_state, rnd, ctx["shared"], per_site["stats"])
    params, opt_state = server_step(server_tx, mean_delta, state.opt_state, state.params,
                                    server_objective, state.model_state, ctx["round_rng"], data)

    model_state, site_model_state = state.model_state, state.site_model_state
    if state.model_state:
      # Under FedBN the global statistics are only used to evaluate the global model.
      model_state = sent_total["model_state"]
      if fedbn:
        site_model_state = scatter_sites(site_model_state, rnd.cohort, per_site["model_state"])

    new_state = ServerState(params=params, model_state=model_state, opt_state=opt_state,
                            site_model_state=site_model_state, round=rnd.t + 1,
                            aggregator_state=agg_state,
                            site_params=scatter_sites(state.site_params, rnd.cohort,
                                                      per_site["local"]),
                            site_noise=scatter_sites(state.site_noise, rnd.cohort,
                                                     per_site["noise"]))
    metrics = round_metrics(sums["loss"], 2 * rnd.num_in,
                            dp_overflow=ctx["cohort_overflow"] + sums["overflow"],
                            secagg=secagg_metrics, **agg_metrics)
    return new_state, metrics

  def round_fn(state: ServerState, data: FederatedData, sampling_rng, client_rng):
    ctx = sites(state, data, sampling_rng, client_rng, as_rows=False)
    return finish(state, data, ctx, ctx["sums"])

  if secure_sum is None:
    return round_fn
  return secure_round(sites, finish, secure_sum, renormalize=site_dp is None)


def secure_round(sites: Callable, finish: Callable, secure_sum: Callable,
                 renormalize: bool) -> Callable:
  """make_round's round with the sum over the sites done by `secure_sum` on the host.

  `renormalize`: the sites' weights were normalised over the whole cohort; a sum over the
  survivors of dropouts is divided by the survivors' share of the weight, so it stays a
  weighted mean (without site-level DP, whose divisor is the expected cohort size and which
  allows no dropouts). An aborted round keeps the model, its optimizer and the chain's state;
  only the round counter moves on (so the next round draws fresh randomness).
  """

  @jax.jit
  def first_half(state, data, sampling_rng, client_rng):
    ctx = sites(state, data, sampling_rng, client_rng, as_rows=True)
    key = jax.random.fold_in(jax.random.fold_in(client_rng, secagg_round.SECAGG_KEY), state.round)
    return ctx, key

  @functools.partial(jax.jit, donate_argnums=0)
  def second_half(state, data, ctx, total, survived, ok, secagg_metrics):
    sent_like = {"delta": state.params, "model_state": state.model_state}
    sent_total = jax.flatten_util.ravel_pytree(sent_like)[1](total)
    if renormalize:
      kept = jnp.dot(ctx["weights"], survived.astype(jnp.float32))
      sent_total = jax.tree.map(lambda a: a / jnp.maximum(kept, 1e-30), sent_total)
    new_state, metrics = finish(state, data, ctx, sent_total, secagg_metrics)
    keep = lambda new, old: jnp.where(ok, new, old)
    new_state = jax.tree.map(keep, new_state, state)._replace(round=state.round + 1)
    return new_state, metrics

  def round_fn(state, data, sampling_rng, client_rng):
    ctx, key = first_half(state, data, sampling_rng, client_rng)
    rows = ctx["per_site"].pop("row")
    present = np.asarray(ctx["rnd"].in_cohort) > 0
    result = secure_sum(rows, present, key)
    metrics = {"survivors": jnp.int32(result.survived.sum()),
               "aborted": jnp.int32(result.aborted), "clipped": jnp.int32(result.clipped),
               "host_seconds": jnp.float32(result.host_seconds)}
    return second_half(state, data, ctx, jnp.asarray(result.total, jnp.float32),
                       jnp.asarray(result.survived), jnp.asarray(not result.aborted), metrics)

  round_fn.jittable = False
  return round_fn
