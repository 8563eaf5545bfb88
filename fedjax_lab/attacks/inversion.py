r"""Gradient inversion of the updates a training run recorded, and its command.

The attack (Hatamizadeh et al. 2022: a server that replays a site's local training on
candidate images until the replayed update matches the one it received) is
attacks/inversion_attack.py; how much it leaked (SSIM, PSNR, RDLV) attacks/leakage.py. Both
are re-exported here: `from fedjax_lab.attacks import inversion as inv` reaches all of it.

  python -m fedjax_lab.attacks.inversion --config configs/inversion_digits.py [--workdir W] [--out D]

attacks the updates a training run recorded (attack.record_sites / attack.record_rounds,
attacks/record.py) in W, or, without --workdir, a freshly simulated site; it writes
leakage.json and grid PNGs (originals above reconstructions) to --out (default
runs/inversion-<config>), and prints one line per site.
"""

import json
import os

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import cli
from fedjax_lab.attacks import record
from fedjax_lab.attacks.conv_matmul import conv_as_matmul  # noqa: F401  (re-exported)
from fedjax_lab.attacks.inversion_attack import (  # noqa: F401  (re-exported)
    BN_MOMENTUM, DEFAULTS, Local, Target, _flat, analytic_first_layer, analytic_label,
    attack_config, attack_sites, batch_stats, gradient_proxy, make_attack, make_target,
    match_loss, replay, revealed_batch_stats, schedule, soft_cross_entropy, stack,
    total_variation)
from fedjax_lab.attacks.leakage import (  # noqa: F401  (re-exported)
    leakage, matched, mean_ci, psnr, save_grid, ssim)
from fedjax_lab.errors import ConfigError
from fedjax_lab.experiment import Experiment
from fedjax_lab.models.cnn import image_shape
from fedjax_lab.privacy import randomness
from fedjax_lab.privacy.shares import example_dp_divisor

def local_for(exp, count: int) -> Local:
  """The local hyper-parameters of a site of `count` examples in Experiment `exp`."""
  cfg = exp.config
  data_shape = tuple(exp.train.x.shape[1:])
  clip, divisor = None, 1.0
  if exp.example_dp is not None:  # the replay clips like DP-SGD (its noise is unknown)
    clip = cfg.dp.clip_norm
    divisor = float(example_dp_divisor(exp.example_dp, cfg.client.batch_size, float(count)))
  return Local(tx=exp.client_tx, lr=cfg.client.lr, local_steps=cfg.client.local_steps,
               num_images=count, image_shape=image_shape(cfg.model, data_shape),
               data_shape=data_shape, num_classes=exp.train.num_classes, clip_norm=clip,
               divisor=divisor)


def target_for(exp, rec: dict, reveal_bn: bool = True, known_labels: bool = False) -> Target:
  """The Target of a recorded (or simulated) update, attacks/record.py's dict."""
  cfg, n = exp.config, int(rec["count"])
  # Records from before rng_impl was saved hold threefry keys.
  rng = randomness.wrap_key_data(rec["rng"], rec.get("rng_impl", "threefry2x32"))
  positions = None
  if exp.example_dp is not None:  # Poisson batches: known only when every example joins
    positions = jnp.tile(jnp.arange(n), (cfg.client.local_steps, 1))
  labels = jnp.asarray(exp.train.y)[jnp.asarray(rec["rows"])] if known_labels else None
  return make_target(rec["global_params"], rec["global_model_state"], rec["delta"],
                     rec["model_state"], rng, n, cfg.client.batch_size, cfg.client.local_steps,
                     cfg.client.shuffle, labels=labels, reveal_bn=reveal_bn, positions=positions)


def attack_record(exp, rec: dict, cfg=None, key=None, reveal_bn=True):
  """Attacks one recorded update; returns (reconstructions [R, n, ...], leakage dict)."""
  cfg = attack_config(cfg if cfg is not None else exp.config.attack.inversion)
  local = local_for(exp, int(rec["count"]))
  target = target_for(exp, rec, reveal_bn=reveal_bn)
  key = jax.random.key(0) if key is None else key
  xs, _, _ = attack_sites(exp.model, local, cfg, stack([target]), key)
  originals = np.asarray(exp.train.x)[np.asarray(rec["rows"])]
  prior = np.asarray(exp.test.x).mean(0)
  return xs[0], leakage(xs[0], originals, prior, local.image_shape, cfg["ssim_window"],
                        cfg["ssim_sigma"])


def simulate(exp, round_number: int, site: int) -> dict:
  """A fresh site's update: train round_number - 1 rounds, then what `site` sends next."""
  state = exp.run_rounds(exp.init_state(), round_number - 1)
  return record.site_update(exp, state, round_number - 1, site)


def main(argv):
  """python -m fedjax_lab.attacks.inversion --config C [--workdir W] [--out D]"""
  del argv
  cli.quiet_logs()
  config, path = cli.load_config(_CONFIG)
  name = os.path.splitext(os.path.basename(path))[0]
  try:
    cfg = attack_config(config.attack.inversion)
    exp = Experiment(config)  # validates the config and loads the data
  except ConfigError as e:
    cli.fail(str(e))
  out = cli.make_workdir(flags.FLAGS.out or os.path.join("runs", f"inversion-{name}"))
  workdir = flags.FLAGS.workdir
  if workdir:
    recs = [record.load(p) for p in record.list_records(workdir)]
    if not recs:
      cli.fail(f"--workdir: no recorded updates in {workdir}/{record.FOLDER}; train with "
               "--config.attack.record_sites=S, --config.attack.record_rounds=R,")
  else:  # a fresh site: the first listed site (or 0) at the first listed round (or the last)
    site = int(config.attack.record_sites[0]) if config.attack.record_sites else 0
    rnd = int(config.attack.record_rounds[0]) if config.attack.record_rounds else config.rounds
    recs = [simulate(exp, rnd, site)]
  results = []
  for rec in recs:
    xs, leak = attack_record(exp, rec, cfg)
    tag = f"round{int(rec['round'])}_site{int(rec['site'])}"
    originals = np.asarray(exp.train.x)[np.asarray(rec["rows"])]
    best = matched(xs, originals, local_for(exp, int(rec["count"])).image_shape,
                   cfg["ssim_window"], cfg["ssim_sigma"])
    save_grid(os.path.join(out, f"{tag}.png"), originals, best,
              local_for(exp, int(rec["count"])).image_shape,
              titles=[f"{s:.2f}" for s in leak["ssim"]])
    row = {"record": tag, **{k: [float(v) for v in leak[k]] for k in leak}}
    results.append(row)
    print(f"{tag}: images={int(rec['count'])} ssim={np.mean(leak['ssim']):.3f} "
          f"prior_ssim={np.mean(leak['prior_ssim']):.3f} psnr={np.mean(leak['psnr']):.1f} "
          f"rdlv={np.mean(leak['rdlv']):.2f} grid={os.path.join(out, tag + '.png')}")
  with open(os.path.join(out, "leakage.json"), "w") as f:
    json.dump({"attack": cfg, "results": results}, f, indent=2)


if __name__ == "__main__":  # the flags only for the command: importing defines none
  _CONFIG = cli.define_config_flag(default=os.path.join(cli.CONFIGS, "inversion_digits.py"))
  flags.DEFINE_string("workdir", None, "A training workdir with recorded updates "
                      "(attack.record_sites); without it a fresh site is simulated.")
  flags.DEFINE_string("out", None, "Output folder (default runs/inversion-<config>).")
  app.run(main, flags_parser=cli.parse_flags)
