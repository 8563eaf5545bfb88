"""Every test sees 8 virtual CPU devices, so multi-device code paths are always exercised.

fedjax_lab is imported as installed (`pip install -r requirements.txt` installs it, editable)
or from the repository root that `python -m pytest` runs in.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
