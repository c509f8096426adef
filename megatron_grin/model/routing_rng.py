"""Counter-based random numbers for routing: same draw for the same token on every rank and on replay.

SparseMixer-v2 samples experts (Gumbel-max) and draws a Bernoulli per pick. Megatron gives every TP rank
a *different* shard of tokens under sequence parallelism, pipeline stages see layers in different
orders, and activation recomputation re-runs the forward. A stateful generator cannot keep all of those
consistent, so each uniform is a pure function of *what* it is for:

    key      = (seed, iteration)                                   -- set by the trainer
    counter  = (token_id, lane_block, layer_number*4 + stream, microbatch)

with token_id = global_sample * seq_len + position (global over DP and SP shards). The generator is
Philox4x32-10 with Triton's constants and round structure, so a Triton kernel using ``tl.randint``
with the same key/counters reproduces these numbers bit for bit (see megatron_grin/ops).

Uniforms are ``((x >> 9) + 0.5) * 2**-23``: strictly inside (0, 1) in float32, so ``-log(-log(u))``
never produces inf or NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
_M32 = 0xFFFFFFFF

STREAM_ROUTING = 0
STREAM_INPUT_JITTER = 1


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values (Triton's ``tl.philox`` round structure).

    A 32x32-bit product fits in 64 bits; int64 multiplication wraps modulo 2**64, so its low 64 bits are
    exact and one multiply gives both halves (``p >> 32`` sign-extends, which the 32-bit masks undo).
    c1/c3 keep their high garbage between rounds: they are only XORed into masked words.
    """
    device = next((c.device for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)), None)  # ints join it
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64, device=device) & _M32 for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    k0, k1 = k0 & _M32, k1 & _M32
    for _ in range(rounds):
        prod_b, prod_a = c2 * PHILOX_ROUND_B, c0 * PHILOX_ROUND_A
        c0, c1 = ((prod_b >> 32) ^ c1 ^ k0) & _M32, prod_b
        c2, c3 = ((prod_a >> 32) ^ c3 ^ k1) & _M32, prod_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1 & _M32, c2, c3 & _M32


def bits_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> float32 strictly inside (0, 1)."""
    return ((x >> 9).to(torch.float32) + 0.5) * (2.0**-23)


def routing_uniforms(token_ids: torch.Tensor, num_lanes: int, top_k: int, *, seed: int, iteration: int,
                     layer_number: int, microbatch: int, stream: int = STREAM_ROUTING) -> torch.Tensor:
    """Uniforms of shape [T, top_k, num_lanes] for the given global token ids.

    Lane e < num_experts feeds the Gumbel draw of expert e, the last lane the Heun Bernoulli.
    """
    blocks = (num_lanes + 3) // 4
    device = token_ids.device
    tok = token_ids.to(torch.int64).view(-1, 1, 1)
    lane_block = torch.arange(top_k * blocks, device=device, dtype=torch.int64).view(1, top_k, blocks)
    c2 = (layer_number * 4 + stream) & _M32
    x0, x1, x2, x3 = philox4x32(tok, lane_block, c2, microbatch, seed, iteration)
    bits = torch.stack((x0, x1, x2, x3), dim=-1).reshape(tok.shape[0], top_k, blocks * 4)
    return bits_to_uniform(bits[..., :num_lanes])


@dataclass
class RoutingStep:
    """Where in training we are; the trainer updates it, routers read it."""

    seed: int = 1234
    iteration: int = 0


_STEP = RoutingStep()


def set_routing_seed(seed: int) -> None:
    _STEP.seed = int(seed)


def set_routing_iteration(iteration: int) -> None:
    """Call once per optimizer step (before its first micro-batch)."""
    _STEP.iteration = int(iteration)


def routing_step() -> RoutingStep:
    return _STEP


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@dataclass
class MicrobatchCounter:
    """Per-layer micro-batch index that replays under activation recomputation.

    A fresh training forward takes the next index. A forward run without grad (the first pass of an
    activation checkpoint) remembers its index; the recompute, which runs inside backward, takes them
    back in order (backward visits micro-batches in forward order in every megatron schedule).
    """

    iteration: int = -1
    next_index: int = 0
    pending: list = field(default_factory=list)

    def take(self) -> tuple[int, int]:
        step = routing_step()
        if _in_backward() and self.pending:
            return self.pending.pop(0)
        if step.iteration != self.iteration:
            self.iteration, self.next_index = step.iteration, 0
            self.pending.clear()
        key = (step.iteration, self.next_index)
        self.next_index += 1
        if not torch.is_grad_enabled():
            self.pending.append(key)
        return key


def global_token_ids(seq_local: int, batch: int, *, seq_rank: int = 0, seq_shards: int = 1,
                     sample_offset: int = 0, device: Optional[torch.device] = None) -> torch.Tensor:
    """Global token ids of a [seq_local, batch] shard, flattened s-major like megatron's [S*B] view.

    id = (sample_offset + b) * seq_total + (seq_rank * seq_local + s): independent of how the sequence
    is split over TP ranks (SP) and of how samples are split over DP ranks.
    """
    seq_total = seq_local * seq_shards
    s = torch.arange(seq_local, device=device, dtype=torch.int64).view(-1, 1) + seq_rank * seq_local
    b = torch.arange(batch, device=device, dtype=torch.int64).view(1, -1) + sample_offset
    return (b * seq_total + s).reshape(-1)
