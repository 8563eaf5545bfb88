"""DPD-fVAE: a federated class-conditional VAE whose decoder alone is shared (and private).

Pfitzner & Arnrich 2022, "DPD-fVAE: Synthetic Data Generation Using Federated Variational
Autoencoders With Differentially-Private Decoder". Every site trains a conditional VAE on its
own data; only the decoder is synchronised (`generative.sync = "decoder"`) or the whole VAE
(`"all"`, plain federated VAE). The decoder then turns z ~ N(0, I) and a label into a
labelled synthetic data set that can be shared.

  models.py    conditional conv VAE (images) and MLP VAE (expression vectors), the losses
  federated.py one round, vmapped over sites: client_update / aggregate / server_update
  train.py     python -m fedjax_lab.generative.train --config configs/dpd_fvae.py --workdir D
  sample.py    python -m fedjax_lab.generative.sample --workdir D --out synth.npz
  evaluate.py  classifier-on-synthetic accuracy, Frechet distance, per-class image grids

Privacy: see docs/dp.md ("The federated VAE (DPD-fVAE): what epsilon covers").
"""
