"""Qwen 3's backward: Llama's (minillm.train.llama) with the per-head norms of Q and K and NEOX RoPE
taken backwards (minillm.train.common), as minillm.arch.qwen3's forward is Llama's with that
attention block."""

from functools import partial

from . import llama
from .common import per_head_normed_qkv_backward

backward = partial(llama.backward, qkv_backward=per_head_normed_qkv_backward)
