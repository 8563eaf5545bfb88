"""Optimizers by name, for `client.optimizer` and `server.optimizer` in configs.

    tx = make_optimizer("esgd", 0.1, update_interval=5)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params, obj_fn=obj_fn)

Every optimizer comes back as an `optax.GradientTransformationExtraArgs`, so the
round code ALWAYS passes `obj_fn` (params -> scalar loss on the current
minibatch); the optimizers that do not read the curvature ignore it.

Names and hyperparameters (defaults in `HYPERPARAMETERS`):

* sgd, momentum (heavy ball; `nesterov`), adam, adamw, yogi, adagrad: optax.
* lion: optax.lion (Chen et al. 2023), weight_decay defaults to 0 here, not
  optax's 1e-3, so that no optimizer decays weights unless asked.
* sophia: optax.contrib.sophia (Liu et al. 2023), Hutchinson estimator seeded
  by `seed`; weight_decay defaults to 0 (optax: 1e-4).
* sam: optax.contrib.sam (Foret et al. 2021) in transparent mode around SGD
  (`momentum`) with adversarial radius `rho`. ONE UPDATE CALL IS HALF A SAM
  STEP: with sync_period=2, odd calls (1st, 3rd, ...) move the parameters to the
  adversarial point w + rho * g / ||g||, even calls take the descent step from
  the cached w with the gradient computed at the adversarial point. The caller
  counts update calls as local steps, so `client.local_steps` must be a multiple
  of `sync_period` (see `local_steps_multiple`), otherwise the site returns
  adversarially perturbed parameters.
* esgd: `fedjax_lab.optim.esgd.esgd` (Dauphin et al. 2015).
* adahessian: `fedjax_lab.optim.adahessian.adahessian` (Yao et al. 2021).

`hessian_update_every` is accepted as another name for `update_interval`.

The curvature optimizers (`CURVATURE_OPTIMIZERS`) take Hessian-vector products
of `obj_fn`. Under example-level DP, on private data that is a release DP-SGD
does not account for: `check_dp_compatible` makes it a config error unless a
public calibration set (`optim.public_data`) supplies the objective. The server
holds no data: as server optimizers they need that public set too
(`check_server_optimizer`).
"""

import itertools
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.errors import ArgumentError, ConfigError
# Names, not modules: the package re-exports the functions `esgd` and
# `adahessian` under the names of their modules.
from fedjax_lab.optim.adahessian import adahessian
from fedjax_lab.optim.adahessian import AdaHessianState
from fedjax_lab.optim.esgd import esgd
from fedjax_lab.optim.esgd import ESGDState

OPTIMIZERS: tuple[str, ...] = (
    "sgd", "momentum", "adam", "adamw", "yogi", "adagrad", "lion", "sophia",
    "sam", "esgd", "adahessian")

# The optimizers whose update reads `obj_fn` (Hessian-vector products).
CURVATURE_OPTIMIZERS: frozenset[str] = frozenset(
    {"sophia", "esgd", "adahessian"})

_ALIASES = {"hessian_update_every": "update_interval"}


# --- Hyperparameter checks: each returns a problem string, or None if fine. ---


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _decay(x) -> Optional[str]:
  if _is_real(x) and 0.0 <= x < 1.0:
    return None
  return f"must be a number in [0, 1), got {x!r}"


def _positive(x) -> Optional[str]:
  if _is_real(x) and x > 0 and math.isfinite(x):
    return None
  return f"must be a number > 0, got {x!r}"


def _non_negative(x) -> Optional[str]:
  if _is_real(x) and x >= 0 and math.isfinite(x):
    return None
  return f"must be a number >= 0, got {x!r}"


def _count(minimum: int) -> Callable[[Any], Optional[str]]:
  def check(x):
    if isinstance(x, numbers.Integral) and not isinstance(x, bool) and (
        x >= minimum):
      return None
    return f"must be an integer >= {minimum}, got {x!r}"
  return check


def _integer(x) -> Optional[str]:
  return _count(-(2**31))(x)


def _boolean(x) -> Optional[str]:
  return None if isinstance(x, bool) else f"must be true or false, got {x!r}"


def _decay_or_none(x) -> Optional[str]:
  if x is None:
    return None
  problem = _decay(x)
  return problem and problem.replace("[0, 1)", "[0, 1) or None")


def _positive_or_none(x) -> Optional[str]:
  if x is None:
    return None
  problem = _positive(x)
  return problem and problem.replace("> 0", "> 0 or None")


def _power(x) -> Optional[str]:
  if _is_real(x) and 0.0 < x <= 1.0:
    return None
  return f"must be a number in (0, 1], got {x!r}"


# name -> {hyperparameter: (default, check)}.
HYPERPARAMETERS: Mapping[str, Mapping[str, tuple[Any, Callable]]] = {
    "sgd": {"momentum": (0.0, _decay), "nesterov": (False, _boolean)},
    "momentum": {"momentum": (0.9, _decay), "nesterov": (False, _boolean)},
    "adam": {"b1": (0.9, _decay), "b2": (0.999, _decay),
             "eps": (1e-8, _positive)},
    "adamw": {"b1": (0.9, _decay), "b2": (0.999, _decay),
              "eps": (1e-8, _positive), "weight_decay": (1e-4, _non_negative)},
    "yogi": {"b1": (0.9, _decay), "b2": (0.999, _decay),
             "eps": (1e-3, _positive)},
    "adagrad": {"initial_accumulator_value": (0.1, _non_negative),
                "eps": (1e-7, _positive)},
    "lion": {"b1": (0.9, _decay), "b2": (0.99, _decay),
             "weight_decay": (0.0, _non_negative)},
    "sophia": {"b1": (0.965, _decay), "b2": (0.99, _decay),
               "eps": (1e-8, _positive), "weight_decay": (0.0, _non_negative),
               "gamma": (0.01, _positive),
               "clip_threshold": (1.0, _positive_or_none),
               "update_interval": (10, _count(1)), "seed": (0, _integer)},
    "sam": {"rho": (0.05, _positive), "momentum": (0.0, _decay),
            "sync_period": (2, _count(2))},
    "esgd": {"b1": (0.9, _decay), "b2": (0.999, _decay_or_none),
             "eps": (1e-4, _positive), "weight_decay": (0.0, _non_negative),
             "update_interval": (10, _count(1)),
             "warmup_steps": (20, _count(0)), "num_probes": (1, _count(1)),
             "seed": (0, _integer)},
    "adahessian": {"b1": (0.9, _decay), "b2": (0.999, _decay),
                   "eps": (1e-4, _positive),
                   "weight_decay": (0.0, _non_negative),
                   "hessian_power": (1.0, _power),
                   "update_interval": (1, _count(1)),
                   "spatial_averaging": (True, _boolean),
                   "num_probes": (1, _count(1)), "seed": (0, _integer)},
}


def _resolve_hparams(name: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
  """Defaults overridden by `hparams`, after aliases and checks."""
  spec = HYPERPARAMETERS[name]
  given = {}
  for key, value in hparams.items():
    canonical = _ALIASES.get(key, key)
    if canonical in given:
      raise ArgumentError(
          f"optimizer_args.{key}",
          f"given twice (as {key!r} and as {canonical!r}); keep one")
    if canonical not in spec:
      allowed = ", ".join(sorted(spec)) or "none"
      raise ArgumentError(
          f"optimizer_args.{key}",
          f"not a hyperparameter of optimizer {name!r}; allowed: {allowed}")
    problem = spec[canonical][1](value)
    if problem:
      raise ArgumentError(f"optimizer_args.{key}", problem)
    given[canonical] = value
  return {k: given.get(k, default) for k, (default, _) in spec.items()}


def _ignore_extra_args(
    tx: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Wraps `tx` so that its update accepts and drops keyword extras.

  Unlike optax.with_extra_args_support, this also covers ExtraArgs
  transformations with a closed keyword list (optax.contrib.sam's update takes
  only `grad_fn`, so `obj_fn=` would raise a TypeError).
  """

  def update(updates, state, params=None, **extra_args):
    del extra_args
    return tx.update(updates, state, params)

  return optax.GradientTransformationExtraArgs(tx.init, update)


def _safe_normalize() -> optax.GradientTransformation:
  """g / ||g||, with 0 for a zero gradient (optax's normalize gives NaN).

  A zero gradient is routine here (a site whose minibatch is all padding), and
  sam blends branches arithmetically, so one NaN would poison the parameters.
  """

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def _build(name: str, lr: float, h: dict[str, Any]):
  """The optax transformation for a validated name and hyperparameters."""
  if name in ("sgd", "momentum"):
    return optax.sgd(lr, momentum=h["momentum"] or None,
                     nesterov=h["nesterov"])
  if name == "adam":
    return optax.adam(lr, b1=h["b1"], b2=h["b2"], eps=h["eps"])
  if name == "adamw":
    return optax.adamw(lr, b1=h["b1"], b2=h["b2"], eps=h["eps"],
                       weight_decay=h["weight_decay"])
  if name == "yogi":
    return optax.yogi(lr, b1=h["b1"], b2=h["b2"], eps=h["eps"])
  if name == "adagrad":
    return optax.adagrad(
        lr, initial_accumulator_value=h["initial_accumulator_value"],
        eps=h["eps"])
  if name == "lion":
    return optax.lion(lr, b1=h["b1"], b2=h["b2"],
                      weight_decay=h["weight_decay"])
  if name == "sophia":
    # Raw uint32 key data, like our own optimizers' states (see reseed_probes).
    estimator = optax.contrib.hutchinson_estimator_diag_hessian(
        random_seed=jax.random.key_data(jax.random.key(h.pop("seed"))))
    return optax.contrib.sophia(lr, hessian_diagonal_fn=estimator, **h)
  if name == "sam":
    outer = optax.sgd(lr, momentum=h["momentum"] or None)
    adversarial = optax.chain(_safe_normalize(), optax.sgd(h["rho"]))
    return optax.contrib.sam(outer, adversarial,
                             sync_period=h["sync_period"], reset_state=True,
                             opaque_mode=False)
  if name == "esgd":
    return esgd(lr, **h)
  if name == "adahessian":
    return adahessian(lr, **h)
  raise AssertionError(f"no builder for {name!r}")  # OPTIMIZERS is out of sync.


def make_optimizer(
    name: str,
    learning_rate: float,
    **hparams,
) -> optax.GradientTransformationExtraArgs:
  """The optimizer called `name`, ready for `update(..., obj_fn=obj_fn)`.

  Args:
    name: one of `OPTIMIZERS`.
    learning_rate: step size, a number > 0. (To sweep it inside jit, build with
      1.0 and multiply the updates: every optimizer here applies the learning
      rate as its last, linear stage.)
    **hparams: overrides of `HYPERPARAMETERS[name]`; `hessian_update_every` is
      another name for `update_interval`.

  Returns:
    An optax.GradientTransformationExtraArgs. Its update takes
    (updates, state, params, obj_fn=...); `params` is required by sophia, sam,
    esgd and adahessian, `obj_fn` by sophia, esgd and adahessian.

  Raises:
    errors.ArgumentError naming "optimizer", "lr" or "optimizer_args.<name>":
      unknown name, learning rate <= 0, unknown or invalid hyperparameter (the
      config layer, `errors.config_keys("client")`, names the config key).
  """
  if name not in OPTIMIZERS:
    raise ArgumentError("optimizer", f"unknown {name!r}; allowed: {', '.join(OPTIMIZERS)}")
  if not _is_real(learning_rate) or not (
      learning_rate > 0 and math.isfinite(learning_rate)):
    raise ArgumentError("lr", f"must be a number > 0, got {learning_rate!r}")
  resolved = _resolve_hparams(name, hparams)
  tx = _build(name, float(learning_rate), resolved)
  if name in CURVATURE_OPTIMIZERS:
    return tx  # Their chains forward obj_fn to the curvature estimate.
  return _ignore_extra_args(tx)


def local_steps_multiple(name: str, **hparams) -> int:
  """Local steps must be a multiple of this for the update to end on a descent.

  1 for every optimizer but sam, for which it is `sync_period` (see the module
  docstring). Config validation can check `client.local_steps % m == 0`.
  """
  if name == "sam":
    return hparams.get("sync_period", HYPERPARAMETERS["sam"]["sync_period"][0])
  return 1


def check_dp_compatible(
    optim_name: str, dp_level: str, public_data: Optional[str], key: str
) -> None:
  """Raises a ConfigError for a client curvature optimizer DP does not cover.

  Args:
    optim_name: the client optimizer's name (`client.optimizer`).
    dp_level: `dp.level`: "none", "example" or "site".
    public_data: `optim.public_data`, or None / "" if not configured.
    key: the config key to name in the error, e.g. "client.optimizer".

  Raises:
    ConfigError: dp.level="example", the optimizer reads the curvature, and
      there is no public calibration data.
  """
  # What each DP level covers. "example": the mechanism is the clipped, noised
  # gradient of each local step, so anything else computed from private
  # examples, like a Hessian-vector product of their loss, escapes it; the
  # curvature must come from public examples (client.py then evaluates obj_fn on
  # them only) or the optimizer is refused. "site": the mechanism clips and
  # noises the site's whole update, whatever function of the site's data made
  # it, so curvature on the site's own private minibatch is inside it. (The
  # server optimizer has no objective under any level: check_server_optimizer.)
  if (dp_level != "example" or optim_name not in CURVATURE_OPTIMIZERS
      or public_data):
    return
  raise ConfigError(
      key,
      f"{optim_name!r} takes Hessian-vector products of the loss, and with "
      f"dp.level={dp_level!r} a Hessian-vector product on private data is a "
      "release that DP-SGD does not cover; set optim.public_data to a public "
      f"calibration set, or use a non-curvature optimizer ({_plain_names()})")


def check_server_optimizer(optim_name: str, public_data: Optional[str],
                           key: str = "server.optimizer") -> None:
  """Raises a ConfigError for a curvature server optimizer without public data.

  The server step (algorithms/fedavg.py `server_step`) takes the mean site
  update as a pseudo-gradient; it is not the gradient of a loss the server
  could evaluate (it holds no data, and under DP sees only the privatized
  aggregate). A curvature server optimizer therefore takes its Hessian-vector
  products on a minibatch of the public calibration set (`optim.public_data`),
  which is post-processing at every DP level; without one it is refused.
  """
  if optim_name not in CURVATURE_OPTIMIZERS or public_data:
    return
  raise ConfigError(
      key,
      f"{optim_name!r} takes Hessian-vector products of an objective, and the "
      "server holds no data: its step takes the mean site update as a pseudo-"
      "gradient; set optim.public_data to a public calibration set for its "
      f"curvature, or use a non-curvature optimizer ({_plain_names()})")


def _plain_names() -> str:
  return ", ".join(n for n in OPTIMIZERS if n not in CURVATURE_OPTIMIZERS)


def reseed_probes(opt_state: Any, key: jax.Array) -> Any:
  """Gives every curvature estimator in `opt_state` a fresh probe key.

  `make_optimizer(...).init` seeds the probe key from the `seed` hyperparameter
  alone, so a client optimizer re-initialized every round, or vmapped over
  sites, would draw the SAME probes every round and on every site. Call this
  after init with a key folded in with the round and site index:

      state = reseed_probes(tx.init(params), jax.random.fold_in(key, site))

  Works under jit and vmap (one key per site).

  Args:
    opt_state: a state from one of this package's optimizers.
    key: a typed or raw PRNG key.

  Returns:
    `opt_state` with the `key` of each ESGD, AdaHessian and Hutchinson (sophia)
    state replaced by a distinct fold-in of `key`; all else unchanged.
  """
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  kinds = (ESGDState, AdaHessianState, optax.contrib.HutchinsonState)
  index = itertools.count()

  def reseed(node):
    if isinstance(node, kinds):
      fresh = jax.random.fold_in(key, next(index))
      if fresh.dtype != jax.random.key(0).dtype:
        # A ChaCha20 key (dp.randomness=secret, privacy/randomness.py): the states hold threefry
        # data. The probes need no secret: DP holds whatever they are (check_dp_compatible).
        return node._replace(key=jax.random.bits(fresh, (2,), jnp.uint32))
      return node._replace(key=jax.random.key_data(fresh))
    return node

  return jax.tree.map(reseed, opt_state,
                      is_leaf=lambda node: isinstance(node, kinds))
