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


def sample_cohort(rng, num_sites: int, cohort_size: int) -> jax.Array:
  """[cohort_size] distinct site ids, uniformly without replacement (all sites if equal)."""
  if cohort_size == num_sites:
    return jnp.arange(num_sites, dtype=jnp.int32)
  return jax.random.choice(rng, num_sites, (cohort_size,), replace=False).astype(jnp.int32)


def round_cohort(sampling_rng, round_index, num_sites: int, cohort_size: int) -> jax.Array:
  """The uniform cohort of round `round_index`: sample_cohort(fold_in(sampling_rng, round))."""
  return sample_cohort(jax.random.fold_in(sampling_rng, round_index), num_sites, cohort_size)
