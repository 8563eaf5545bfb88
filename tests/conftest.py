"""Every test sees 8 virtual CPU devices, so multi-device code paths are always exercised.

fedjax_lab is imported as installed (`pip install -r requirements.txt` installs it, editable)
or from the repository root that `python -m pytest` runs in.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache: many tests (and the train.py processes they start, which
# inherit these variables) compile the same tiny rounds; reusing them cuts ~25% of the suite's
# CPU time. Entries are keyed by the program, jax version and flags, so a stale one is never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "fedjax_lab_tests_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
