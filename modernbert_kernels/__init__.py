"""Triton kernels, each beside the plain PyTorch reference it is tested against. Importing touches no GPU."""
from .flash_attn import attention_reference, flash_attn_varlen, work_table
from .rotary import apply_rotary, apply_rotary_reference
