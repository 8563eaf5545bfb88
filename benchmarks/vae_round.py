r"""One federated VAE round (digits, sync=decoder, no DP): vmapped over sites vs site by site.

  python benchmarks/vae_round.py [--sites 50] [--rounds 10] [--repeats 3]

"vmapped": FederatedVAE.round under one jit (client_update jax.vmap'ped over the sites, then
aggregate, the lab's aggregator chain, and server_update). "loop": the same client_update jitted for ONE site and called
in a Python loop over the sites, messages stacked on the host side, then the same aggregate
and server_update jitted. Both use the same keys, so they must end with the same decoder
(checked). Times are medians over `repeats` of `rounds` rounds after a warm-up round.
The last line is `RATIO loop/vmapped=<x>`.
"""

import argparse
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import fedjax_lab

fedjax_lab.setup_cpu_devices()  # before jax: one XLA device per CPU core
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def build(num_sites: int, model: str):
  from fedjax_lab import runs
  dpd_fvae = runs.load_module(os.path.join(runs.ROOT, "configs", "dpd_fvae.py"), "dpd_fvae")
  from fedjax_lab.generative import federated, models, train
  c = dpd_fvae.get_config()
  c.data.num_sites = num_sites
  c.generative.model = model
  data, tr, _ = train.load_data(c)
  vae = models.CVAE(c.generative, tr.num_classes, tr.x.shape[1:])
  return c, data, federated.FederatedVAE(vae, c, None)


def make_loop(fed, data, keys):
  client = jax.jit(fed.client_update)

  @jax.jit
  def finish(state, messages, sites):
    joined = jnp.ones((data.num_sites,), bool)
    update, _ = fed.aggregate(messages, joined, data.count, state["round"], keys["client"])
    return {"server": fed.server_update(state["server"], update), "sites": sites,
            "round": state["round"] + 1}

  def round_fn(state):
    base = jax.random.fold_in(keys["client"], state["round"])
    messages, sites = [], []
    for s in range(data.num_sites):
      site = jax.tree.map(lambda x: x[s], state["sites"])
      m, new_site, _ = client(state["server"]["params"], site, data.idx[s], data.count[s],
                              jax.random.fold_in(base, s), data)
      messages.append(m)
      sites.append(new_site)
    stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
    return finish(state, stack(messages), stack(sites))

  return round_fn


def timed(fn, state, rounds):
  t0 = time.perf_counter()
  for _ in range(rounds):
    state = fn(state)
  jax.block_until_ready(state)
  return (time.perf_counter() - t0) / rounds, state


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sites", type=int, default=50)
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--model", default="conv", choices=("conv", "mlp"))
  args = parser.parse_args()
  c, data, fed = build(args.sites, args.model)
  from fedjax_lab.generative import federated
  keys = federated.round_keys(c.seed)
  vmapped_step = jax.jit(lambda s: fed.round(s, data, keys)[0])
  loop_step = make_loop(fed, data, keys)
  init = fed.init(c.seed, data.num_sites)
  # Warm-up (compiles) and the equality check after 2 rounds.
  a = vmapped_step(vmapped_step(init))
  b = loop_step(loop_step(init))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-5)
  times = {"vmapped": [], "loop": []}
  for _ in range(args.repeats):  # interleaved, so load changes hit both alike
    times["vmapped"].append(timed(vmapped_step, init, args.rounds)[0])
    times["loop"].append(timed(loop_step, init, args.rounds)[0])
  med = {k: float(np.median(v)) for k, v in times.items()}
  print(f"devices={jax.device_count()} ({jax.devices()[0].platform}) sites={args.sites} "
        f"local_steps={c.client.local_steps} batch={c.client.batch_size} "
        f"{args.model} VAE (conv {c.generative.conv_features}, mlp {c.generative.hidden}) "
        f"latent={c.generative.latent_dim}")
  for k in ("vmapped", "loop"):
    print(f"{k:8s} {1e3 * med[k]:9.1f} ms/round  (runs: "
          + ", ".join(f"{1e3 * t:.1f}" for t in times[k]) + ")")
  print("same decoder after 2 rounds: yes")
  print(f"RATIO loop/vmapped={med['loop'] / med['vmapped']:.2f}")


if __name__ == "__main__":
  main()
