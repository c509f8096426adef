"""GrinCoreAttention: the local spec's ``core_attention``, which never materialises [b, heads, s, s].

megatron's unfused ``DotProductAttention`` repeats K/V to every query head, computes the full score
matrix, applies GRIN's sliding window as a dense mask on it and keeps the probabilities for backward:
O(s^2) memory and time per layer. This module keeps megatron-core 0.16's constructor, forward and
[sq, b, np, hn] -> [sq, b, np * hn] layout and runs an exact kernel from ``ops/window_attention.py``:

| case | kernel |
|---|---|
| full causal (no window, or the window covers every key), sq == sk | SDPA, ``is_causal``, GQA native |
| sliding window, CUDA, sq == sk | compiled FlexAttention, cached sliding-window BlockMask |
| sliding window on CPU, a KV-cache chunk (sq != sk), or FlexAttention unusable | blockwise kernel |
| ``no_mask`` (inference decode without a window) | SDPA, unmasked |
| an explicit ``attention_mask`` | SDPA with that dense mask (logged as a warning: O(s^2) mask) |

Masking follows megatron's local attention: with ``config.window_size = (left, 0)`` (via
``is_layer_window_attention``, so ``window_attn_skip_freq`` holds) query i at position i + sk - sq sees
keys [pos - left, pos] whatever the mask type. Softmax is always fp32 (fp64 for fp64 inputs).
Refused with an error naming this class: context parallelism, a non-vanilla softmax, a right window,
attention dropout > 0 in training, ``packed_seq_params`` (THD) and ``attention_bias``.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_grin.ops import window_attention as wa

log = logging.getLogger(__name__)

#: Megatron-LM's --attention-backend names this module runs, and the SDPA kernels each allows for full
#: causal attention (None: torch chooses per call). The sliding window runs FlexAttention / blockwise.
SDPA_KERNELS = {"auto": None, "flash": (SDPBackend.FLASH_ATTENTION,),
                "fused": (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)}
WINDOW_KERNELS = ("auto", "flex", "blockwise")

_logged: set[str] = set()
_flex_broken: list[str] = []  # why compiled FlexAttention failed in this process (then: blockwise)


def log_once(level: int, message: str) -> None:
    """Log a message the first time only: the kernel choices are per process, not per layer or step."""
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


def window_kernel_name(device_type: str, window_kernel: str = "auto") -> str:
    """The sliding-window kernel for a device: compiled FlexAttention on CUDA, else blockwise."""
    flex = device_type == "cuda" and window_kernel != "blockwise" and not _flex_broken
    return "compiled FlexAttention" if flex else "blockwise kernel"


def describe(attention_backend: str, window_left: Optional[int], device_type: str) -> str:
    """One line naming the kernels GrinCoreAttention runs (the model-build log line)."""
    kernels = SDPA_KERNELS[attention_backend]
    sdpa = ("torch picks flash / cuDNN / memory-efficient" if kernels is None
            else " / ".join(wa.SDPA_KERNELS[k] for k in kernels) + " only")
    line = f"GrinCoreAttention: full causal -> SDPA ({sdpa})"
    if window_left is not None:
        line += f"; sliding window (left {window_left}) -> {window_kernel_name(device_type)} on {device_type}"
    return line


class GrinCoreAttention(MegatronModule):
    """megatron ``core_attention`` with memory linear in sequence length (see the module docstring).

    Constructor and forward are those of megatron-core 0.16.1's ``DotProductAttention``; extra
    keywords come through ``ModuleSpec(params=...)``: ``attention_backend`` (Megatron-LM's
    --attention-backend among auto / flash / fused: which SDPA kernels full causal attention may use),
    ``window_kernel`` ("auto": FlexAttention on CUDA else blockwise; "flex"; "blockwise") and
    ``block_size`` (query rows per block of the blockwise kernel). No parameters, no state.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, *, attention_backend: str = "auto",
                 window_kernel: str = "auto", block_size: int = 256):
        super().__init__(config=config)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type, self.attention_type = attn_mask_type, attention_type
        self.pg_collection = pg_collection
        self._check_supported(config, attention_backend, window_kernel)
        self.sdpa_kernels = SDPA_KERNELS[attention_backend]
        self.window_kernel, self.block_size = window_kernel, int(block_size)
        # apply_query_key_layer_scaling divides the scale by layer_number and multiplies the fp32 scores
        # back in megatron: a guard for fp16 softmax, numerically a no-op; our softmax is fp32 anyway.
        self.softmax_scale = 1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else float(softmax_scale)
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)
        self.window_left: Optional[int] = None
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            left = config.window_size[0]
            self.window_left = None if left < 0 else int(left)  # (-1, 0): TE's spelling of "no window"

    @staticmethod
    def _check_supported(config, attention_backend: str, window_kernel: str) -> None:
        """Refuse, naming the setting, what this module does not implement."""
        if attention_backend not in SDPA_KERNELS:
            raise ValueError(f"GrinCoreAttention runs --attention-backend {tuple(SDPA_KERNELS)}; got "
                             f"{attention_backend!r} (unfused/local build megatron's DotProductAttention)")
        if attention_backend == "fused" and not torch.cuda.is_available():
            raise ValueError("--attention-backend fused selects SDPA's cuDNN / memory-efficient kernels, which "
                             "need CUDA; use auto or flash on CPU (GrinCoreAttention)")
        if window_kernel not in WINDOW_KERNELS:
            raise ValueError(f"GrinCoreAttention window_kernel must be one of {WINDOW_KERNELS}, got {window_kernel!r}")
        if config.context_parallel_size != 1:
            raise NotImplementedError("GrinCoreAttention does not support --context-parallel-size > 1 "
                                      "(TEDotProductAttention does: --transformer-impl transformer_engine)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise NotImplementedError(f"GrinCoreAttention supports softmax_type 'vanilla' only, got "
                                      f"{config.softmax_type!r}")
        if config.window_size is not None and config.window_size[0] >= 0 and config.window_size[1] != 0:
            raise NotImplementedError(f"GrinCoreAttention supports causal windows (right = 0) only, got "
                                      f"window_size={tuple(config.window_size)}")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        """[sq, b, np, hn] query and [sk, b, ng, hn] key/value (TP-local heads) -> [sq, b, np * hn]."""
        if packed_seq_params is not None:
            raise NotImplementedError("GrinCoreAttention does not support packed sequences (THD "
                                      "packed_seq_params): use --transformer-impl transformer_engine")
        if attention_bias is not None:
            raise NotImplementedError("GrinCoreAttention does not support attention_bias")
        if self.training and self.dropout_p > 0:
            raise NotImplementedError(f"GrinCoreAttention has no attention dropout (got {self.dropout_p}): set "
                                      "--attention-dropout 0 (GRIN trains without it), or --attention-backend "
                                      "unfused for megatron's DotProductAttention with dropout")
        sq, b, heads, hn = query.shape
        # [s, b, h, d] -> [b, h, s, d] views; kernels return [b, h, s, d] stored [s, b, h, d] where they can,
        # so the reshape below is a view and linear_proj saves the same storage the kernel saved.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        out = self._attend(q, k, v, attention_mask, mask_type)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)

    # -- dispatch ---------------------------------------------------------------------------------------
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: AttnMaskType) -> Tensor:
        sq, sk = q.shape[-2], k.shape[-2]
        if attention_mask is not None:
            return self._masked(q, k, v, attention_mask, attn_mask_type)
        window = self.window_left
        if window is not None and window >= sk - 1:
            window, attn_mask_type = None, AttnMaskType.causal  # the band covers every key: plain causal
        if window is not None:
            return self._window(q, k, v, window)
        if attn_mask_type == AttnMaskType.no_mask or sq == 1:  # decode: the one query sees every key
            return self._sdpa(q, k, v, causal=False)
        if attn_mask_type != AttnMaskType.causal:
            raise NotImplementedError(f"GrinCoreAttention: attn_mask_type {attn_mask_type.name} needs an "
                                      "attention_mask")
        if sq != sk:  # a KV-cache chunk: causal aligned bottom-right, which SDPA's is_causal is not
            log_once(logging.DEBUG, "GrinCoreAttention: causal chunk (sq != sk) -> blockwise kernel")
            return wa.window_attention_blockwise(q, k, v, None, self.softmax_scale, self.block_size)
        return self._sdpa(q, k, v, causal=True)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        key = f"{q.device.type} {q.dtype} causal={causal} sq==sk={q.shape[-2] == k.shape[-2]}"
        if key not in _logged:  # torch's own choice, once per kind of call: host-only, no sync
            _logged.add(key)
            self._report_sdpa_kernel(q, k, v, causal)
        return wa.sdpa_attention(q, k, v, self.softmax_scale, causal=causal, kernels=self.sdpa_kernels)

    def _report_sdpa_kernel(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
        if self.sdpa_kernels is None:
            choice = wa.sdpa_kernel_choice(q, k, v, causal)
        else:
            with sdpa_kernel(list(self.sdpa_kernels)):
                choice = wa.sdpa_kernel_choice(q, k, v, causal)
        where = f"{q.device.type} {str(q.dtype).replace('torch.', '')}"
        if choice == "ERROR":
            raise RuntimeError(f"GrinCoreAttention: no SDPA kernel allowed by --attention-backend can run "
                               f"{where} attention with these shapes; use --attention-backend auto")
        level = logging.WARNING if choice == "math" else logging.INFO
        suffix = " (materialises the scores: use bf16 on GPU)" if choice == "math" else ""
        log_once(level, f"GrinCoreAttention: {'causal' if causal else 'unmasked'} attention -> SDPA "
                         f"{choice} kernel ({where}){suffix}")

    def _window(self, q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
        same_len = q.shape[-2] == k.shape[-2]
        if self.window_kernel == "flex" and not (q.is_cuda and same_len):
            raise RuntimeError("GrinCoreAttention window_kernel='flex' needs CUDA tensors and sq == sk")
        if same_len and window_kernel_name(q.device.type, self.window_kernel) == "compiled FlexAttention":
            try:
                out = wa.flex_window_attention(q, k, v, window, self.softmax_scale, compiled=True)
                log_once(logging.DEBUG, f"GrinCoreAttention: sliding window (left {window}) -> compiled "
                                        f"FlexAttention on {q.device.type}")
                return out
            except Exception as exc:  # noqa: BLE001 - no Triton, a compile error, the recompile limit
                if self.window_kernel == "flex":
                    raise
                _flex_broken.append(f"{type(exc).__name__}: {exc}")
                log_once(logging.WARNING, f"GrinCoreAttention: compiled FlexAttention failed "
                                           f"({_flex_broken[-1][:300]}); the sliding window runs the "
                                           f"blockwise kernel from now on")
        log_once(logging.DEBUG, f"GrinCoreAttention: sliding window (left {window}) -> blockwise kernel "
                                f"(block {self.block_size}) on {q.device.type}")
        return wa.window_attention_blockwise(q, k, v, window, self.softmax_scale, self.block_size)

    def _masked(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor,
                attn_mask_type: AttnMaskType) -> Tensor:
        """An explicit mask (True = masked, megatron's convention), AND the causal / window structure."""
        sq, sk = q.shape[-2], k.shape[-2]
        keep = ~attention_mask.to(torch.bool)
        if self.window_left is not None or attn_mask_type == AttnMaskType.causal:
            keep = keep & wa.block_allowed(0, sq, 0, sk, sk - sq, self.window_left, q.device)
        log_once(logging.WARNING, "GrinCoreAttention: an explicit attention_mask -> SDPA with a dense "
                                   "[sq, sk] mask (O(s^2)); the trainer passes none")
        return wa.sdpa_masked(q, k, v, keep, self.softmax_scale)
