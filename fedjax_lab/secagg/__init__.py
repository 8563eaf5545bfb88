"""Secure aggregation (SecAgg / SecAgg+) for fedjax_lab: see docs/secure_aggregation.md.

  secure_sum(updates [K, d], key, SecAggConfig(...), dropouts=None) -> SecAggResult
  mask_update(...)  client side: quantize + mask, vmapped over the cohort inside jit
  Server.unmask(masked_rows, responses)  server side: from what it was sent, only
  SecureSum(config)(rows, present, key)  the round's host step (secagg.enabled; round.py)
"""

from fedjax_lab.secagg.config import (SecAggConfig, levels_for, resolve_neighbours,
                                      validate_secagg)
from fedjax_lab.secagg.masking import mask_update, quantize_sites, unmask_sum
from fedjax_lab.secagg.protocol import (STAGES, Abort, Advertise, EncryptedShare, SecAggResult,
                                        Server, Site, UnmaskResponse, bytes_per_site,
                                        draw_dropouts, neighbour_graph, secure_sum, split_key)
from fedjax_lab.secagg.quantization import decode_sum, quantize
from fedjax_lab.secagg.round import RoundSum, SecureSum, min_survivors

__all__ = [
    "SecAggConfig", "levels_for", "resolve_neighbours", "validate_secagg", "mask_update", "quantize_sites",
    "unmask_sum", "STAGES", "Abort", "Advertise", "EncryptedShare", "SecAggResult", "Server",
    "Site", "UnmaskResponse", "bytes_per_site", "draw_dropouts", "neighbour_graph",
    "secure_sum", "split_key", "decode_sum", "quantize", "RoundSum", "SecureSum", "min_survivors",
]
