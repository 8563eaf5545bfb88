"""The aggregator chain: what happens to the site updates between the sites and the server.

A round's aggregation is a chain of `Aggregator`s composed like `optax.chain`: per-site
transforms, then ONE sum over the sites (sharding.map_sum_sites, on device, chunked), then
server-side finishing in reverse order, as pfl's postprocessors do (postprocess_one_user,
postprocess_server) and as TFF nests its aggregator factories (DifferentiallyPrivateFactory
around SecureSumFactory around SumFactory). Each member is four pure functions:

  init() -> state                                   checkpointed in the server state ({}: none)
  broadcast(state, rnd, shared) -> shared           server, before the sites, first to last:
                                                    values every site gets (a clip norm C_t,
                                                    a noise share); `shared` is a dict
  site(update, site, shared) -> (update, stats)     at each site, first to last; `stats`: a
                                                    dict of per-site scalars (e.g. the update
                                                    norm), returned stacked [slots]
  server(total, state, rnd, shared, stats) -> (total, state, metrics)
                                                    after the sum, last to first

and, optionally, the stacked path (a non-linear reducer: median, Krum; fedjax_lab/robust.py):

  mix(x, weights, valid, state, rnd, shared) -> (x, weights, valid)
                                                    pre-aggregation on the cohort's stacked,
                                                    flattened updates x [slots, d] (nearest
                                                    neighbour mixing, bucketing, a Byzantine
                                                    attack), first to last
  reduce(x, weights, valid, state, rnd, shared) -> aggregate [d]
                                                    replaces the sum; at most one member has it

A chain with a `mix` or a `reduce` makes the round keep every site's update ([slots, ...],
`reduce_stacked`) instead of summing it on the fly, which costs slots x the model's memory, so
only such chains take that path; without either, the round is the sum it always was.
`valid` is 0.0 for a padded Poisson slot, whose row a reducer must ignore.

`chain(...)` composes members; its state is the tuple of its STATEFUL members' states (one:
that state itself; none: {}), so adding a stateless member (compression, a mask) never
changes the checkpoint layout. Members today: `weighted` (the weighted mean without DP),
`clip` / `adaptive_clip` (NaN-safe clipping to C or to C_t, Andrew et al. 2021),
`gaussian_noise` (parallel or coordinated shares, the empty-cohort server noise) and
`expected_mean` (division by the expected cohort size); robust reducers and pre-aggregation
(robust.py) and Byzantine sites (attacks/byzantine.py) use the stacked path. Secure
aggregation (quantize, mask, modular sum) and compression plug in as further members;
algorithms never see them.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from fedjax_lab.privacy import adaptive_clipping
from fedjax_lab.secagg.quantization import decode_sum, quantize

# Site noise keys hang off fold_in(client_rng, _SITE_NOISE), a value no round index reaches,
# so they never coincide with a round's client-training keys fold_in(client_rng, t).
SITE_NOISE = 0xFFFFFFFF
# Adaptive clipping's count-noise keys hang off another such value.
SITE_COUNT_NOISE = 0xFFFFFFFE
# The server's own noise (update and count) for a round in which no site was sampled.
SERVER_NOISE = 0xFFFFFFFC


class RoundInfo(NamedTuple):
  """What the server knows of the round (replicated)."""
  t: jax.Array           # round index
  client_rng: Any        # the run's client root key (noise keys are folded from it)
  cohort: jax.Array      # [slots] site ids
  in_cohort: jax.Array   # [slots] 1.0 for a sampled site, 0.0 for a padded Poisson slot
  num_in: jax.Array      # in_cohort.sum()


class SiteInfo(NamedTuple):
  """What one site knows (inside the vmap over the cohort)."""
  site: jax.Array        # its id
  weight: jax.Array      # its aggregation weight p_k
  present: jax.Array     # 1.0, or 0.0 for a padded slot of a Poisson cohort
  steps: Any = None      # the local steps it took (client.ClientOutput.num_steps)


class Aggregator(NamedTuple):
  init: Callable
  broadcast: Callable
  site: Callable
  server: Callable
  mix: Callable | None = None     # the stacked path (module docstring); None: no such step
  reduce: Callable | None = None


def _no_state():
  return {}


def _no_broadcast(state, rnd, shared):
  return shared


def _no_server(total, state, rnd, shared, stats):
  return total, state, {}


def make(init=_no_state, broadcast=_no_broadcast, site=None, server=_no_server, mix=None,
         reduce=None) -> Aggregator:
  """An Aggregator from the parts it has (the others are identities)."""
  return Aggregator(init, broadcast, site or (lambda update, s, shared: (update, {})), server,
                    mix, reduce)


def weighted_mean(x, weights, valid, state=None, rnd=None, shared=None):
  """Σ_k w_k x_k / Σ_k w_k over the valid rows: the stacked path's reducer when a chain has
  pre-aggregation but no reducer of its own (the same mean the sum path computes)."""
  return rows_mean(jnp.where(valid > 0, weights, 0.0), x)


def rows_mean(w, x):
  """Σ_k w_k x_k / Σ_k w_k of the rows of x [K, ...] weighted by w [K] (0 if every w_k is 0)."""
  return jnp.tensordot(w, x, axes=1) / jnp.maximum(w.sum(), 1e-30)


def chain(*members: Aggregator) -> Aggregator:
  """Members' site transforms in order, their server steps in reverse order."""
  stateful = [i for i, m in enumerate(members)
              if not (isinstance(m.init(), dict) and not m.init())]

  def split(state):
    states = [{} for _ in members]
    if len(stateful) == 1:
      states[stateful[0]] = state
    elif stateful:
      for i, s in zip(stateful, state):
        states[i] = s
    return states

  def join(states):
    if not stateful:
      return {}
    if len(stateful) == 1:
      return states[stateful[0]]
    return tuple(states[i] for i in stateful)

  def init():
    return join([m.init() for m in members])

  def broadcast(state, rnd, shared):
    for m, s in zip(members, split(state)):
      shared = m.broadcast(s, rnd, shared)
    return shared

  def site(update, s, shared):
    stats = {}
    for m in members:
      update, more = m.site(update, s, shared)
      stats.update(more)
    return update, stats

  def server(total, state, rnd, shared, stats):
    states, metrics = split(state), {}
    for i in reversed(range(len(members))):
      total, states[i], more = members[i].server(total, states[i], rnd, shared, stats)
      metrics.update(more)
    return total, join(states), metrics

  reducers = [i for i, m in enumerate(members) if m.reduce is not None]
  mixers = [i for i, m in enumerate(members) if m.mix is not None]
  if len(reducers) > 1:
    raise ValueError("chain: more than one member reduces the stacked updates")
  if reducers and mixers and max(mixers) > reducers[0]:
    raise ValueError("chain: a pre-aggregation (mix) member after the reducer")
  if not (reducers or mixers):
    return Aggregator(init, broadcast, site, server)

  def reduce(x, weights, valid, state, rnd, shared):
    states = split(state)
    for i in mixers:
      x, weights, valid = members[i].mix(x, weights, valid, states[i], rnd, shared)
    if not reducers:
      return weighted_mean(x, weights, valid)
    return members[reducers[0]].reduce(x, weights, valid, states[reducers[0]], rnd, shared)

  return Aggregator(init, broadcast, site, server, None, reduce)


def reduce_stacked(aggregator: Aggregator, updates, weights, valid, state, rnd, shared):
  """The aggregate of the cohort's stacked updates (leaves [slots, ...]) by the chain's
  mix and reduce steps, on the updates flattened to [slots, d] (float32)."""
  ravel = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]
  unravel = jax.flatten_util.ravel_pytree(jax.tree.map(lambda a: a[0], updates))[1]
  x = jax.vmap(ravel)(updates).astype(jnp.float32)
  if aggregator.reduce is None:  # a lone pre-aggregation member: then the mean
    aggregator = chain(aggregator)
  return unravel(aggregator.reduce(x, weights.astype(jnp.float32), valid.astype(jnp.float32),
                                   state, rnd, shared))


def stacked(aggregator: Aggregator) -> bool:
  """Whether the round must keep every site's update for this chain (a mix or a reduce)."""
  return aggregator.reduce is not None or aggregator.mix is not None


def _scale(tree, c):
  return jax.tree.map(lambda a: c * a, tree)


def weighted() -> Aggregator:
  """Σ_k p_k Δ_k: each site scales its update by its weight (the round's sum adds them)."""
  return make(site=lambda update, s, shared: (_scale(update, s.weight), {}))


def clip_by_global_norm(tree, clip_norm):
  """Scales the whole pytree to L2 norm <= clip_norm; returns (clipped, norm).

  NaN-safe: a tree whose norm is not finite becomes all zeros (a `where`, since NaN * 0 is
  NaN), which is within the sensitivity bound like any clipped update.
  """
  norm = optax.global_norm(tree)
  finite = jnp.isfinite(norm)
  factor = jnp.where(finite, jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12)), 0.0)
  return jax.tree.map(lambda a: jnp.where(finite, a * factor, 0.0).astype(a.dtype), tree), norm


def _clip_site(update, s, shared):
  clipped, norm = clip_by_global_norm(update, shared["clip_norm"])
  nonfinite = jnp.where(s.present > 0, ~jnp.isfinite(norm), False).astype(jnp.int32)
  return clipped, {"norm": norm, "nonfinite": nonfinite}


def _clip_metrics(shared, stats):
  return {"clip_norm": jnp.asarray(shared["clip_norm"], jnp.float32),
          "nonfinite_updates": stats["nonfinite"].sum()}


def clip(clip_norm: float) -> Aggregator:
  """Each update clipped to `clip_norm` (NaN-safe; non-finite updates become 0 and are
  counted in `nonfinite_updates`); later members read the sensitivity as shared['clip_norm']."""
  return make(broadcast=lambda state, rnd, shared: {**shared, "clip_norm": clip_norm},
              site=_clip_site,
              server=lambda total, state, rnd, shared, stats: (
                  total, state, _clip_metrics(shared, stats)))


class AdaptiveClip(NamedTuple):
  """Andrew et al. 2021, geometric update: C_{t+1} = C_t exp(-clip_lr (b̃_t - target_quantile)).

  Each site also adds its share of N(0, count_stddev^2) to the centred count Σ (b_k - 1/2),
  split over the sites like the update noise (parallel: each the full std; coordinated:
  std / sqrt(n) each).
  """
  target_quantile: float  # γ
  clip_lr: float          # η_C
  count_stddev: float     # σ_b


def count_noise(count_rng, cohort, in_cohort, num_in, count_stddev: float, coordinated: bool):
  """Σ_k ξ_k over the sites in the cohort: the noise on adaptive clipping's count.

  Each site draws its share ξ_k from a key folded with its site id, N(0, σ_b^2) (parallel)
  or N(0, σ_b^2 / n) for the n sites of the round (coordinated), as the update noise.
  """
  share = count_stddev
  if coordinated:
    share = share / jnp.sqrt(jnp.maximum(num_in, 1.0))
  draws = jax.vmap(lambda site: jax.random.normal(jax.random.fold_in(count_rng, site)))(cohort)
  return share * jnp.dot(in_cohort, draws)


def adaptive_clip(clip_norm: float, params: AdaptiveClip, coordinated: bool,
                  expected_cohort: float, pad_to: int = 0) -> Aggregator:
  """`clip` to the state's C_t (C_0 = clip_norm), then C_{t+1} from the noised fraction of
  this round's updates with norm <= C_t (privacy/adaptive_clipping.py). An empty cohort's
  count noise comes from the server, as its update noise does (gaussian_noise); `pad_to`:
  the server tops parallel noise up to that many shares, as gaussian_noise does."""

  def server(total, state, rnd, shared, stats):
    count_rng = jax.random.fold_in(jax.random.fold_in(rnd.client_rng, SITE_COUNT_NOISE), rnd.t)
    server_rng = jax.random.fold_in(jax.random.fold_in(rnd.client_rng, SERVER_NOISE), rnd.t)
    server_count_noise = params.count_stddev * jax.random.normal(
        jax.random.fold_in(server_rng, 1))
    noise = count_noise(count_rng, rnd.cohort, rnd.in_cohort, rnd.num_in, params.count_stddev,
                        coordinated)
    if pad_to:
      noise = noise + jnp.sqrt(jnp.maximum(pad_to - rnd.num_in, 0.0)) * server_count_noise
    else:
      noise = noise + jnp.where(rnd.num_in == 0, server_count_noise, 0.0)
    next_clip = adaptive_clipping.next_clip_norm(
        state, stats["norm"], rnd.in_cohort, noise, expected_cohort, params.target_quantile,
        params.clip_lr)
    return total, next_clip, _clip_metrics(shared, stats)

  return make(init=lambda: jnp.asarray(clip_norm, jnp.float32),
              broadcast=lambda state, rnd, shared: {**shared, "clip_norm": state},
              site=_clip_site, server=server)


def site_noise(noise_rng, site, like, share):
  """One site's noise share, N(0, share^2) per coordinate of `like`, from a key folded with
  its site id, as a real site would draw it: it never depends on the cohort order, the
  device or the chunk the site ran in."""
  keys = jax.random.split(jax.random.fold_in(noise_rng, site), len(jax.tree.leaves(like)))
  leaves = [share * jax.random.normal(k, l.shape, l.dtype)
            for k, l in zip(keys, jax.tree.leaves(like))]
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def gaussian_noise(noise_multiplier: float, coordinated: bool,
                   empty_round_divisor: float,
                   grid: tuple[float, int] | None = None, pad_to: int = 0) -> Aggregator:
  """Every site adds its share of N(0, (z C)^2), C = shared['clip_norm'] (a clip member
  before it): the full z C ("parallel"), or z C / sqrt(n) for the n sites of the round
  ("coordinated", Dopamine: the sum carries exactly (z C)^2). A round whose Poisson cohort
  is empty sends nothing; the server then adds N(0, (z C)^2) itself, divided by
  `empty_round_divisor` like the sum it stands for (the accountant composes that release
  every round). `grid` (secure aggregation's (clip_range, levels)): that noise is clipped and
  stochastically rounded onto the grid as one site's row would be, since every other round's
  sum lies on it (privacy/secagg_delta.py: K_1 of a zero update).

  `pad_to` (parallel noise under site-level DP: the cohort's slots): the server adds
  sqrt(pad_to - n) z C more, so the sum's noise is N(0, pad_to (z C)^2) whatever the round's
  n. Without it the noise's size tells the realised cohort size (its variance is n (z C)^2,
  measured to high precision over many coordinates), which amplification by sampling hides
  and whose change with the target's presence the Gaussian accountant does not cover."""

  def broadcast(state, rnd, shared):
    share = noise_multiplier * shared["clip_norm"]
    if coordinated:
      share = share / jnp.sqrt(jnp.maximum(rnd.num_in, 1.0))
    noise_rng = jax.random.fold_in(jax.random.fold_in(rnd.client_rng, SITE_NOISE), rnd.t)
    return {**shared, "noise_share": share, "noise_rng": noise_rng}

  def site(update, s, shared):
    noise = site_noise(shared["noise_rng"], s.site, update, shared["noise_share"])
    return jax.tree.map(jnp.add, update, noise), {}

  def server(total, state, rnd, shared, stats):
    server_rng = jax.random.fold_in(jax.random.fold_in(rnd.client_rng, SERVER_NOISE), rnd.t)
    noise = site_noise(server_rng, 0, total, noise_multiplier * shared["clip_norm"])
    if grid is not None:
      noise = on_grid(jax.tree.map(lambda z: z / empty_round_divisor, noise),
                      jax.random.fold_in(server_rng, 2), *grid)
      divisor = 1.0
    else:
      divisor = empty_round_divisor
    if pad_to:  # covers the empty round too (pad_to >= 1 shares then)
      scale = jnp.sqrt(jnp.maximum(pad_to - rnd.num_in, 0.0)) / divisor
      total = jax.tree.map(lambda d, z: d + scale * z, total, noise)
      return total, state, {}
    empty = rnd.num_in == 0
    total = jax.tree.map(lambda d, z: d + jnp.where(empty, z / divisor, 0.0), total, noise)
    return total, state, {}

  return make(broadcast=broadcast, site=site, server=server)


def on_grid(tree, key, clip_range: float, levels: int):
  """Each value clipped to [-clip_range, clip_range] and stochastically rounded onto secure
  aggregation's grid (step 2 clip_range / levels), as the secure sum encodes one site's row."""
  leaves = jax.tree.leaves(tree)
  keys = jax.random.split(key, len(leaves))
  out = [decode_sum(quantize(l.reshape(-1), k, clip_range, levels)[0], 1, clip_range, levels,
                    32).reshape(l.shape).astype(l.dtype) for l, k in zip(leaves, keys)]
  return jax.tree.unflatten(jax.tree.structure(tree), out)


def correlated_noise(correlated, noise_std: float, like, divisor: float) -> Aggregator:
  """The server adds round t's matrix-factorization noise z_t = (C^{-1} w)_t, w ~ N(0,
  noise_std^2) (privacy/mf_noise.py), divided by `divisor` like the sum it joins; the noise
  state (past draws: as secret as the key) is this member's state, so it is checkpointed."""

  def server(total, state, rnd, shared, stats):
    key = jax.random.fold_in(jax.random.fold_in(rnd.client_rng, SERVER_NOISE), rnd.t)
    noise, state = correlated.step(total, state, jax.random.fold_in(key, 4), noise_std)
    return jax.tree.map(lambda d, z: d + z / divisor, total, noise), state, {}

  return make(init=lambda: correlated.init(like), server=server)


def mf_site_dp(clip_norm: float, noise_multiplier: float, correlated, like,
               expected_cohort: float) -> Aggregator:
  """DP-FTRL's chain (Kairouz et al. 2021; matrix-factorization noise): clip each site's
  update to C, the server adds the correlated noise of std z C, / the cohort size."""
  return chain(clip(clip_norm),
               correlated_noise(correlated, noise_multiplier * clip_norm, like, expected_cohort),
               expected_mean(expected_cohort))


def expected_mean(expected_cohort: float) -> Aggregator:
  """Divides each update by the EXPECTED cohort size (its sensitivity stays C / K whatever
  the realised cohort); a padded slot's update vanishes (`where`, not a product: even a NaN)."""
  return make(site=lambda update, s, shared: (jax.tree.map(
      lambda a: jnp.where(s.present > 0, a / expected_cohort, 0.0), update), {}))


def site_dp(clip_norm: float, noise_multiplier: float, coordinated: bool,
            expected_cohort: float, adaptive: AdaptiveClip | None = None,
            grid: tuple[float, int] | None = None, max_cohort: int = 0) -> Aggregator:
  """Site-level DP-FedAvg's chain (McMahan et al. 2018): clip (fixed C, or adaptive C_t),
  Gaussian noise shares, / the expected cohort size; `grid`: gaussian_noise's. Parallel
  noise is topped up by the server to `max_cohort` shares (gaussian_noise's pad_to)."""
  return chain(*site_dp_members(clip_norm, noise_multiplier, coordinated, expected_cohort,
                                 adaptive, grid, max_cohort))


def site_dp_members(clip_norm: float, noise_multiplier: float, coordinated: bool,
                    expected_cohort: float, adaptive: AdaptiveClip | None = None,
                    grid: tuple[float, int] | None = None,
                    max_cohort: int = 0) -> tuple[Aggregator, ...]:
  """site_dp's members (clipping, noise, / expected size), apart: the attack recorder
  replays the first two at a site (attacks/record.py)."""
  pad_to = 0 if coordinated else int(max_cohort)
  if not coordinated and pad_to < 1:
    raise ValueError("site_dp: parallel noise needs max_cohort (the cohort's slots) >= 1")
  clipping = (clip(clip_norm) if adaptive is None
              else adaptive_clip(clip_norm, adaptive, coordinated, expected_cohort, pad_to))
  return (clipping, gaussian_noise(noise_multiplier, coordinated, expected_cohort, grid,
                                   pad_to), expected_mean(expected_cohort))
