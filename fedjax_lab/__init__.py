"""fedjax_lab: one compiled program for private federated learning research.

Importing fedjax_lab changes nothing in the process. On a CPU host a program that wants the
lab's device layout calls `fedjax_lab.setup_cpu_devices()` BEFORE it imports jax (train.py,
the sweep command and the benchmarks do): it splits the host into one XLA device per core (up
to 16), each single-threaded, so the round shards its sites over those devices as it would
over GPUs. XLA's own intra-op threading gains nothing on the tiny per-site matrices of a
vmapped round (benchmarks/RESULTS.md), while one device per core runs the sites in parallel.
FEDJAX_LAB_CPU_DEVICES=1 keeps JAX's default single CPU device, N asks for N devices; an
XLA_FLAGS that already sets the host device count is left alone.
"""

import os
import sys

__version__ = "0.1.0"


def setup_cpu_devices() -> bool:
  """Sets XLA_FLAGS to one single-threaded CPU device per core (see the module docstring).

  Returns whether it set them: False once jax is imported (too late: the backend may be
  initialised), when XLA_FLAGS already sets the host device count, or for one device.
  """
  if "jax" in sys.modules:
    return False
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags:
    return False
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count() or 1
  devices = int(os.environ.get("FEDJAX_LAB_CPU_DEVICES", min(cores, 16)))
  if devices <= 1:
    return False
  os.environ["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count={devices} "
                             "--xla_cpu_multi_thread_eigen=false").strip()
  return True
