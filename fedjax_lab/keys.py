"""The lab's key scheme (docs/design.md), in one place for every module that must reproduce a
round's draws (the round itself, the attacks' recorder, the Flower client, the VAE round):
one root per purpose, folded in with the round index, then the site id."""

import jax
import jax.numpy as jnp


def purpose_keys(root, purposes) -> dict:
  """{name: fold_in(root, number)} for (name, number) in purposes: the numbers are fixed, so
  adding a purpose never shifts the others."""
  return {name: jax.random.fold_in(root, number) for name, number in purposes}


def site_key(client_rng, round_index, site):
  """Site `site`'s key in round `round_index`: fold_in(fold_in(client_rng, round), site)."""
  return jax.random.fold_in(jax.random.fold_in(client_rng, round_index), site)


def site_keys(client_rng, round_index, sites) -> jax.Array:
  """[S] keys of the site ids `sites` [S] in round `round_index` (each as `site_key`)."""
  round_rng = jax.random.fold_in(client_rng, round_index)
  return jax.vmap(lambda s: jax.random.fold_in(round_rng, s))(sites)


# From this many sites on, cohorts are drawn in O(cohort) work (privacy.sampling repeats it
# for Poisson cohorts): the same distribution from another random stream. Every bundled
# config and recorded result has at most 1,500 sites, so below it they keep their cohorts.
LARGE_POPULATION = 2048


def sample_cohort(rng, num_sites: int, cohort_size: int) -> jax.Array:
  """[cohort_size] distinct site ids, uniformly without replacement (all sites if equal).

  jax.random.choice shuffles all num_sites ids: a sort per round, 10 ms at 10^4 sites and
  1.1 s at 10^6 on this CPU. From LARGE_POPULATION sites on (and cohorts of at most a
  quarter of them) the cohort is the first cohort_size distinct ids of a stream of uniform
  draws, in the order they first appear: sequential sampling without replacement, so a
  uniform cohort in uniformly random order, as choice's, from O(cohort log cohort) work."""
  if cohort_size == num_sites:
    return jnp.arange(num_sites, dtype=jnp.int32)
  if num_sites < LARGE_POPULATION or 4 * cohort_size > num_sites:
    return jax.random.choice(rng, num_sites, (cohort_size,), replace=False).astype(jnp.int32)
  return first_distinct(rng, num_sites, cohort_size)


def first_distinct(rng, num_sites: int, cohort_size: int) -> jax.Array:
  """sample_cohort's large-population draw (any num_sites >= 4 cohort_size)."""
  # Draws enough that repeats (about draws^2 / 2 num_sites of them) rarely leave fewer than
  # cohort_size distinct; a batch that does is drawn again. That rejection is exact: the
  # event "at least cohort_size distinct" is symmetric in the site ids, so conditioned on it
  # the first cohort_size distinct ids are still a uniform ordered sample.
  draws = cohort_size + 2 * (cohort_size * cohort_size // num_sites) + 16

  def attempt(i):
    ids = jax.random.randint(jax.random.fold_in(rng, i), (draws,), 0, num_sites)
    order = jnp.argsort(ids, stable=True)  # equal ids keep stream order: the first leads
    by_id = ids[order]
    first = jnp.zeros(draws, bool).at[order].set(
        jnp.concatenate([jnp.ones(1, bool), by_id[1:] != by_id[:-1]]))
    keep = jnp.argsort(~first, stable=True)[:cohort_size]  # first occurrences, stream order
    return ids[keep].astype(jnp.int32), first.sum()

  def again(carry):
    return carry[2] < cohort_size

  def redraw(carry):
    i = carry[0] + 1
    return (i, *attempt(i))

  _, cohort, _ = jax.lax.while_loop(again, redraw, (jnp.int32(0), *attempt(jnp.int32(0))))
  return cohort


def round_cohort(sampling_rng, round_index, num_sites: int, cohort_size: int) -> jax.Array:
  """The uniform cohort of round `round_index`: sample_cohort(fold_in(sampling_rng, round))."""
  return sample_cohort(jax.random.fold_in(sampling_rng, round_index), num_sites, cohort_size)
