r"""DPD-fVAE (Pfitzner & Arnrich 2022): a federated class-conditional VAE on digits whose
decoder alone is synchronised; `:all` synchronises the whole VAE, `:pbmc` is the MLP variant
on the bundled pbmc68k expression vectors (Gaussian likelihood).

  python -m fedjax_lab.generative.train --config configs/dpd_fvae.py --workdir runs/vae
  python -m fedjax_lab.generative.train --config configs/dpd_fvae.py:all --workdir runs/vae_all
  python -m fedjax_lab.generative.train --config configs/dpd_fvae.py --workdir runs/vae_dp1 \
      --config.dp.level=example --config.dp.target_epsilon=1
  python -m fedjax_lab.generative.sample --workdir runs/vae --out synth.npz

This file is its own config (no keys of fedjax_lab/config.py): `data` is the lab's data
block (fedjax_lab.data.sources.default_data_config), the rest is read by
fedjax_lab/generative/train.py.
"""

import ml_collections

from fedjax_lab.data.sources import default_data_config


def get_config(arg: str = "decoder"):
  if arg not in ("decoder", "all", "pbmc"):
    raise ValueError(f"argument must be 'decoder', 'all' or 'pbmc', got {arg!r}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.rounds = 60
  c.data = default_data_config()
  c.data.name = "digits"        # pixels 0..16 are scaled to [0, 1] by the loader
  c.data.num_sites = 10         # 150 digits a site
  c.data.partition = "iid"
  c.generative = ml_collections.ConfigDict(dict(
      sync="all" if arg == "all" else "decoder",  # decoder (DPD-fVAE) | all (full VAE)
      model="conv",             # conv (images) | mlp (vectors)
      latent_dim=8,             # paper: 8
      beta=0.01,                # KL weight; paper: 0.01
      likelihood="bernoulli",   # bernoulli (x in [0, 1]) | gaussian | mse
      conv_features=(16, 32),   # encoder convs (stride 2); the decoder mirrors them
      hidden=(128,),            # mlp widths
      image_shape=(),           # () = square one-channel images from flat inputs
  ))
  c.client = ml_collections.ConfigDict(dict(
      local_steps=10, batch_size=20, lr=0.01, optimizer="adam",  # paper: Adam 0.01, batch 20
      participation=1.0,        # each site joins a round with this probability
  ))
  c.server = ml_collections.ConfigDict(dict(lr=1.0, momentum=0.5))  # paper: SGD 1.0, 0.5
  c.dp = ml_collections.ConfigDict(dict(
      level="none",             # none | example (DP-SGD at the sites) | site (DP-FedAvg)
      target_epsilon=0.0,       # > 0: calibrate noise_multiplier to this epsilon
      noise_multiplier=0.0,     # used when target_epsilon is 0
      clip_norm=1.0,
      delta=1e-5,
      encoder="private",        # example level, sync=decoder: private (sound) | paper
      accountant="rdp",
      randomness="auto",        # secret | seeded | auto: as the lab's dp.randomness (docs/dp.md)
      mechanism="gaussian",     # the only one here (the lab's tree | blt | ... are FedAvg's)
  ))
  c.eval = ml_collections.ConfigDict(dict(
      every=20,                 # log loss/epsilon every this many rounds
      at_end=True,              # classifier-on-synthetic accuracy and Frechet distance
      num_synthetic=1500,       # synthetic examples per trial (balanced labels)
      trials=5,
      classifier_steps=400,
      classifier_hidden=(128,),
      batch_size=1000,
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(every=20, keep=2))
  if arg == "pbmc":
    c.data.name = "pbmc68k"
    c.data.num_sites = 5
    c.generative.model = "mlp"
    c.generative.likelihood = "gaussian"
    c.generative.latent_dim = 16
    c.generative.hidden = (256,)
    c.eval.num_synthetic = 700
  return c
