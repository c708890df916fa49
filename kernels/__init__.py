"""Kernel entry points used by the engine. For each op, one visible choice: Triton on CUDA, else the twin.

(The Triton launchers land with the kernels issue; until then every op is its PyTorch twin.)
"""

from kernels.attention import attention_decode_ref as attention_decode
from kernels.attention import attention_prefill_ref as attention_prefill
from kernels.causal_conv1d import causal_conv1d_ref as causal_conv1d
from kernels.causal_conv1d import causal_conv1d_update_ref as causal_conv1d_update
from kernels.selective_scan import selective_scan_ref as selective_scan
from kernels.ssm_update import ssm_update_ref as ssm_update

__all__ = [
    "attention_decode",
    "attention_prefill",
    "causal_conv1d",
    "causal_conv1d_update",
    "selective_scan",
    "ssm_update",
]
