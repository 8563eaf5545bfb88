r"""FedAvg / FedAdam on CIFAR-100 with the Pachinko split: Reddi et al. 2021's benchmark.

  python train.py --config configs/cifar100_pachinko.py                      # FedAdam
  python train.py --config configs/cifar100_pachinko.py --config.server.optimizer=sgd \
      --config.server.lr=1.0 --config.client.lr=0.316                        # FedAvg
  python train.py --config configs/cifar100_pachinko.py --config.data.mock=True \
      --config.rounds=1 --config.model.features=8,16,16,16                   # offline smoke

Data (fedjax_lab/data/tfds_federated.py, data/pachinko.py): tfds `cifar100`, 500 training
sites x 100 examples by Pachinko allocation (alpha 0.1 over the 20 coarse labels, beta 10
over the fine labels of each), 100 test sites x 100; accuracy is on the 10,000 test images
together. The first run downloads CIFAR-100 (data.download=True, ~160 MB), builds the split
and caches it as an .npz under data.path (or the TFDS data dir); later runs read the .npz.
data.mock=True builds it from tfds.testing.mock_data instead (offline, random images).

Model and hyper-parameters: Reddi et al. 2021 ("Adaptive Federated Optimization", ICLR;
arXiv 2003.00295), section 5 and appendix: ResNet-18 with GroupNorm, 10 sites a round,
1 local epoch of batch 20 (5 SGD steps at 100 examples), 4,000 rounds. Learning rates are the
best grid points of the paper's appendix table as we read them (log10 scale): FedAdam
client 10^-1.5, server 10^0, epsilon 10^-1; FedAvg client 10^-0.5, server 10^0. They were
not re-derived here (no GPU run): check them against the paper before citing.

Expected (paper, Table 2, test accuracy averaged over the last 100 rounds): FedAdam 52.5%,
FedAvg 44.7%. The paper also crops images to 24x24 and flips them at random; this pipeline
does no augmentation, so a run may land a few points lower. A 2-core CPU cannot run this
config in useful time (a round is ~50 ResNet-18 steps); it is meant for one GPU.
"""

from fedjax_lab.config import default_config


def get_config():
  c = default_config()
  c.rounds = 4000
  c.cohort_size = 10
  c.data.name = "cifar100_pachinko"
  c.data.download = True
  c.data.num_sites = 500
  c.data.alpha = 0.1
  c.data.partition = "by_column"
  c.data.column = "site"
  c.model.name = "resnet18_gn"
  c.model.features = (64, 128, 256, 512)
  c.client.optimizer = "sgd"
  c.client.lr = 10 ** -1.5
  c.client.local_epochs = 1.0
  c.client.local_steps = 5
  c.client.batch_size = 20
  c.server.optimizer = "adam"
  c.server.lr = 1.0
  c.server.optimizer_args.eps = 0.1
  c.eval.every = 100
  c.eval.batch_size = 500
  c.checkpoint.every = 100
  return c
