"""fedjax_lab: one compiled program for private federated learning research.

On a CPU host, importing fedjax_lab BEFORE jax splits the host into one XLA device per core
(up to 16), each running single-threaded: the round shards its sites over those devices as it
would over GPUs. XLA's own intra-op threading gains nothing on the tiny per-site matrices of a
vmapped round (benchmarks/RESULTS.md), while one device per core runs the sites in parallel.
Set FEDJAX_LAB_CPU_DEVICES=1 to keep JAX's default single CPU device, or N for N devices;
an XLA_FLAGS that already sets the host device count is left alone.
"""

import os
import sys

__version__ = "0.1.0"


def _split_cpu_into_devices() -> None:
  if "jax" in sys.modules:
    return  # too late: the backend may already be initialised
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags:
    return
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count() or 1
  devices = int(os.environ.get("FEDJAX_LAB_CPU_DEVICES", min(cores, 16)))
  if devices <= 1:
    return
  os.environ["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count={devices} "
                             "--xla_cpu_multi_thread_eigen=false").strip()


_split_cpu_into_devices()
