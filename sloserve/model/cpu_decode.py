"""Native CPU kernels for 4-bit models (cpu_decode.cpp), and where the model uses them.

One stream of SmolLM2-135M decoded at ~16 ms a token in eager torch, against llama.cpp's
~9 ms for the same file (AVX-512 box): the ~50 small torch ops around a layer's four int4
matmuls (residual adds, norms, rotary, the KV write, the attention gather and softmax, dtype
conversions) cost a few microseconds each to dispatch, 30 layers over; and on AVX2-only CPUs
torch's int4 kernel itself moves ~3.5 GB/s. So, once attached:
- every Int4Linear multiplies up to NATIVE_MAX_ROWS rows with q4_linear (16-bit integer
  activations, Q4_1's 20 bytes a group of 32 weights);
- the torch backend's decode rows attend through decode_attention (no gather of the blocks);
- a decode-only step of up to NATIVE_MAX_ROWS rows runs every layer in one decode_layers call
  (single tensor-parallel rank only: it has no all-reduce).
Larger steps use the dense copy (quant.DenseCopy); prompt chunks stay in the Python loop.

The extension is compiled on first use (torch's cpp_extension, 25-50 s on 2 cores, cached in
SLOSERVE_CACHE); without a compiler torch's ops run, as they do with SLOSERVE_CPU_KERNELS=0.
tests/model/test_quant.py holds the kernels to the dequantized grid and the fused decode to
the layer loop.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from sloserve.config import cache_root
from sloserve.model.attention import AttentionMetadata
from sloserve.model.quant import NATIVE_MAX_ROWS, Int4Linear

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_decode.cpp")


@functools.cache
def extension_loaded() -> bool:
    """Build (once per machine) and load the extension; False where it cannot be."""
    if os.environ.get("SLOSERVE_CPU_KERNELS", "1") == "0":
        return False
    from torch.utils import cpp_extension

    build = cache_root() / "cpu-kernels" / f"torch-{torch.__version__}"
    build.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load("sloserve_cpu", [str(SOURCE)], build_directory=str(build),
                           extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:  # no compiler or ninja: the Python path is correct, only slower
        log.warning("CPU decode kernels unavailable (%s); decoding in eager torch",
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
    return True


class FusedDecode:
    """Every layer of a decode-only step of up to NATIVE_MAX_ROWS rows, for a model whose
    projections are Int4Linear (quant.py) without biases."""

    max_rows = NATIVE_MAX_ROWS

    def __init__(self, model):
        c = model.config
        self.heads, self.kv_heads, self.inter = c.num_heads, c.num_kv_heads, \
            c.intermediate_size
        self.eps, self.scale = c.rms_norm_eps, c.head_dim ** -0.5
        self.rotary = model.rotary
        self.weights: list[torch.Tensor] = []  # the order cpu_decode.cpp's kPerLayer names
        for layer in model.layers:
            a, m = layer.self_attn, layer.mlp
            self.weights.append(layer.input_layernorm.weight.detach().float())
            self.weights += _q4(a.qkv_proj) + _q4(a.o_proj)
            self.weights.append(layer.post_attention_layernorm.weight.detach().float())
            self.weights += _q4(m.gate_up_proj) + _q4(m.down_proj)

    def fits(self, rows: int, meta: AttentionMetadata) -> bool:
        return meta.num_decodes == rows <= self.max_rows

    def __call__(self, x: torch.Tensor, positions: torch.Tensor,
                 kv_caches: list[torch.Tensor], meta: AttentionMetadata
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(last layer's output, residual stream before it), as the layer loop returns."""
        x, residual = torch.ops.sloserve_cpu.decode_layers(
            x, positions, kv_caches, meta.slot_mapping, meta.block_tables, meta.seq_lens,
            self.rotary.cos, self.rotary.sin, self.weights, self.heads, self.kv_heads,
            self.inter, self.eps, self.scale)
        return x, residual


def _q4(linear: Int4Linear) -> list[torch.Tensor]:
    return [linear.q4_codes, linear.q4_scales, linear.q4_mins]


def attach(model) -> bool:
    """Native 4-bit matmuls for few rows, native attention for decode rows, and the fused
    decode path where it applies, for a 4-bit float32 CPU model; False where the extension
    does not build."""
    if model.embed_tokens.weight.dtype != torch.float32 or not extension_loaded():
        return False
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.native = True
    if hasattr(model.backend, "native_decode"):
        model.backend.native_decode = True
    if all(_fusable(layer) for layer in model.layers):
        model.fused_decode = FusedDecode(model)
    return True


def _fusable(layer) -> bool:
    a, m = layer.self_attn, layer.mlp
    projections = (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)
    return not (a.all_reduce or m.all_reduce) and \
        all(isinstance(p, Int4Linear) and p.bias is None for p in projections)
