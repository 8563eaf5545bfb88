r"""Trains one federated experiment from a config.

  python train.py                   # configs/digits_fedavg.py, workdir runs/digits_fedavg-<hash>
  python train.py --config configs/pbmc_celltype.py --workdir /tmp/pbmc --config.rounds=20

The command is fedjax_lab/train.py (installed as `fedjax-lab`, same flags); its docstring
says what a run writes.
"""

import fedjax_lab

fedjax_lab.setup_cpu_devices()  # before anything imports jax: one XLA device per CPU core
from fedjax_lab.train import console_main  # noqa: E402

if __name__ == "__main__":
  console_main()
