"""Fused Triton kernels for `MoGEExperts` (ScatterMoE-style): no padding to capacity, no token ever dropped.

With `T` tokens, `k` slots per token, `S = T * k` (token, slot) pairs, `E` experts, hidden size `d`, expert size `f`:

1. Sort once. The flat expert ids `(S,)` are sorted stably; `sort_idx[g]` is the slot `t * k + j` of grouped row `g`,
   so the rows of expert `e` are the contiguous range `offsets[e]:offsets[e + 1]` of "grouped order". Two index arrays
   connect the orders: `grouped_token = sort_idx // k` (which row of `x` a grouped row reads, the gather index) and
   `grouped_slot = sort_idx` (which slot row a grouped row writes, the scatter index). Each program takes `BLOCK_M`
   grouped rows of one expert; an expert's last block is masked. The block table is built on the device from the
   offsets, without a host sync, for a grid of `cdiv(S, BLOCK_M) + E` programs (the spare ones return at once).
2. scatter2scatter (`_scatter_matmul_kernel`): gather input rows, multiply by `W[e]`, add the bias, apply the
   activation or the gate weight, write rows in grouped or scattered order. Forward: up projection (gathered tokens
   -> grouped `Z` and `A = act(Z)`), then down projection (grouped `A` -> gate-weighted rows in slot order).
3. Combine: the `(S, d)` slot rows are viewed as `(T, k, d)` and summed over `k` (fp32, deterministic, no atomics).
4. Backward: `_scatter_matmul_act_grad_kernel` gathers the output gradient rows and multiplies by `W_down[e]`,
   giving `G = dOut[token] @ W_down[e]` `(S, f)`; its epilogue writes `dZ = gate * G * act'(Z)` (grouped) and, for
   the gate gradient, partial sums of `G * A` over each column block (`dgate = <G, A> + <dOut[token], b_down[e]>`).
   `_group_xt_dy_kernel` computes the weight and bias gradients per expert (`dW[e] = dY_e^T X_e`, `db[e] = sum dY_e`;
   an expert without tokens gets exact zeros), and the scatter kernel again gives `dx = sum_k dZ @ W_up[e]`.

Saved for backward: the inputs, the index arrays, and both `Z` and `A` `(S, f)` in grouped order and the input dtype.
That is what autograd saves through `F.linear -> act -> F.linear`, and it spares the backward a re-run of the up
projection GEMM (a third of the forward FLOPs); `Z` is not written at all when no gradient is needed.

All products accumulate in fp32. fp32 inputs use IEEE products unless `torch.set_float32_matmul_precision` allows
TF32, as for `torch.matmul`. On a GPU the kernels are autotuned over a few block configs keyed on the matrix sizes.
Under the Triton interpreter they run on CPU tensors with fixed 32-wide blocks; `TRITON_INTERPRET=1` must then be set
before triton is first imported (triton decorates its own `@jit` helpers, such as `tl.sum`, at that import).
`triton_experts_forward` is wrapped in `torch.compiler.disable`: `torch.compile` graph-breaks around it and runs it
eagerly, so dynamo never traces the Triton launches or the custom autograd Function.
"""

import os

import torch
from torch.autograd.function import once_differentiable


try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable; `triton_experts_forward` then raises
    triton = None

__all__ = ["SUPPORTED_ACTIVATIONS", "is_available", "triton_experts_forward"]

# ACT2FN names the kernels fuse -> the kernels' ACTIVATION code (1: tanh-approximated GELU, 2: exact GELU).
SUPPORTED_ACTIVATIONS = {"gelu_new": 1, "gelu_pytorch_tanh": 1, "gelu": 2, "relu": 3, "silu": 4}

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRET_BLOCK = 32  # every block size under the interpreter: small, but the interpreter is slow per program


def is_available() -> bool:
    """Whether the kernels can run here: triton is importable and there is a CUDA GPU or the interpreter is on."""
    return triton is not None and (_INTERPRET or torch.cuda.is_available())


if triton is not None:

    def _autotune(configs: list, key: list[str]):
        """`triton.autotune` on a GPU; under the interpreter the callers pass fixed block sizes instead."""
        if _INTERPRET:
            return lambda fn: fn
        return triton.autotune(configs=configs, key=key)

    # BLOCK_M is the caller's (the block table depends on it); the act-grad kernel also fixes BLOCK_N (the gate
    # gradient's partial sums have one row per column block).
    _SCATTER_CONFIGS = [
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=5),
    ]
    _ACT_GRAD_CONFIGS = [
        triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]
    _GROUP_CONFIGS = [
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_R": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_R": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_R": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_R": 64}, num_warps=4, num_stages=3),
    ]
    _ACT_GRAD_BLOCK_N = 128

    @triton.jit
    def _activation(z, ACTIVATION: tl.constexpr):
        """act(z) for an fp32 block z."""
        if ACTIVATION == 1:  # 0.5 z (1 + tanh(u)) = z * sigmoid(2u), u = sqrt(2 / pi) (z + 0.044715 z^3)
            u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
            out = z / (1.0 + tl.exp(-2.0 * u))
        elif ACTIVATION == 2:  # 0.5 z (1 + erf(z / sqrt(2)))
            out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
        elif ACTIVATION == 3:
            out = tl.maximum(z, 0.0)
        else:  # silu
            out = z / (1.0 + tl.exp(-z))
        return out

    @triton.jit
    def _activation_grad(z, ACTIVATION: tl.constexpr):
        """act'(z) for an fp32 block z."""
        if ACTIVATION == 1:
            u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
            s = 1.0 / (1.0 + tl.exp(-2.0 * u))
            out = s + 2.0 * z * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        elif ACTIVATION == 2:  # Phi(z) + z phi(z)
            out = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
        elif ACTIVATION == 3:
            out = tl.where(z > 0.0, 1.0, 0.0)
        else:
            s = 1.0 / (1.0 + tl.exp(-z))
            out = s * (1.0 + z * (1.0 - s))
        return out

    @triton.jit
    def _gathered_matmul(
        x_ptr,
        in_rows,
        row_mask,
        w_ptr,
        offs_n,
        N,
        K,
        stride_wk,
        stride_wn,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
    ):
        """(BLOCK_M, BLOCK_N) fp32 x[in_rows] @ w; x is (*, K) row-major, w[k, n] at k*stride_wk + n*stride_wn."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        n_mask = offs_n < N
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(
                x_ptr + in_rows[:, None] * K + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0
            )  # (BLOCK_M, BLOCK_K)
            w = tl.load(
                w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                mask=k_mask[:, None] & n_mask[None, :],
                other=0.0,
            )  # (BLOCK_K, BLOCK_N)
            if UPCAST_DOT:  # the interpreter's `tl.dot` mishandles bf16 (numpy has none)
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc=acc, input_precision=INPUT_PRECISION)
        return acc

    @_autotune(_SCATTER_CONFIGS, key=["N", "K", "BLOCK_M"])
    @triton.jit
    def _scatter_matmul_kernel(
        x_ptr,  # (R_in, K): tokens (GATHER) or grouped rows
        w_ptr,  # (E, ...): w[e, k, n] at e*stride_we + k*stride_wk + n*stride_wn
        bias_ptr,  # (E, N) if HAS_BIAS
        gate_ptr,  # (S,) fp32 gate weight of each grouped row, if GATE
        out_ptr,  # (R_out, N): slot rows (SCATTER) or grouped rows
        pre_ptr,  # (S, N) grouped pre-activation, if SAVE_PRE
        in_rows_ptr,  # (S,) int32 row of x read by each grouped row, if GATHER
        out_rows_ptr,  # (S,) int32 row of out written by each grouped row, if SCATTER
        block_expert_ptr,  # (num_blocks,) int32 expert of each block, num_experts for a spare block
        block_start_ptr,  # (num_blocks,) int32 first grouped row of each block
        offsets_ptr,  # (E + 1,) int32 grouped rows of expert e: offsets[e]:offsets[e + 1]
        num_experts,
        N,
        K,
        stride_we,
        stride_wk,
        stride_wn,
        GATHER: tl.constexpr,
        SCATTER: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SAVE_PRE: tl.constexpr,
        ACTIVATION: tl.constexpr,  # 0: none
        GATE: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """out[out_row(g)] = gate[g] * act(x[in_row(g)] @ W[e] + b[e]) for the BLOCK_M grouped rows g of one block."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert >= num_experts:
            return
        start = tl.load(block_start_ptr + pid_m)
        end = tl.load(offsets_ptr + expert + 1)
        rows = start + tl.arange(0, BLOCK_M)  # grouped rows
        row_mask = rows < end
        if GATHER:
            in_rows = tl.load(in_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            in_rows = rows.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        expert = expert.to(tl.int64)
        acc = _gathered_matmul(
            x_ptr,
            in_rows,
            row_mask,
            w_ptr + expert * stride_we,
            offs_n,
            N,
            K,
            stride_wk,
            stride_wn,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            INPUT_PRECISION,
            UPCAST_DOT,
        )  # (BLOCK_M, BLOCK_N) fp32
        if HAS_BIAS:
            acc += tl.load(bias_ptr + expert * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        mask = row_mask[:, None] & n_mask[None, :]
        if SAVE_PRE:
            pre_ptrs = pre_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :]
            tl.store(pre_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
        if ACTIVATION != 0:
            acc = _activation(acc, ACTIVATION)
        if GATE:
            acc *= tl.load(gate_ptr + rows, mask=row_mask, other=0.0)[:, None]
        if SCATTER:
            out_rows = tl.load(out_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            out_rows = rows.to(tl.int64)
        tl.store(out_ptr + out_rows[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)

    @_autotune(_ACT_GRAD_CONFIGS, key=["N", "K", "BLOCK_M"])
    @triton.jit
    def _scatter_matmul_act_grad_kernel(
        dout_ptr,  # (T, K) output gradient
        w_ptr,  # (E, K, N) down projection, w[e, k, n] at e*stride_we + k*stride_wk + n*stride_wn
        pre_ptr,  # (S, N) grouped pre-activation Z
        act_ptr,  # (S, N) grouped activation A
        gate_ptr,  # (S,) fp32 grouped gate weights
        dpre_ptr,  # (S, N) out: grouped dZ
        dgate_partial_ptr,  # (cdiv(N, BLOCK_N), S) fp32 out: per column block sums of G * A, in slot order
        token_ptr,  # (S,) int32 token of each grouped row
        slot_ptr,  # (S,) int32 slot of each grouped row
        block_expert_ptr,
        block_start_ptr,
        offsets_ptr,
        num_experts,
        num_rows,  # S
        N,
        K,
        stride_we,
        stride_wk,
        stride_wn,
        ACTIVATION: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """G = dout[token(g)] @ W[e]; dZ = gate * G * act'(Z); partial dgate = row sums of G * A in this block."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert >= num_experts:
            return
        start = tl.load(block_start_ptr + pid_m)
        end = tl.load(offsets_ptr + expert + 1)
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        tokens = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        grad = _gathered_matmul(
            dout_ptr,
            tokens,
            row_mask,
            w_ptr + expert.to(tl.int64) * stride_we,
            offs_n,
            N,
            K,
            stride_wk,
            stride_wn,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            INPUT_PRECISION,
            UPCAST_DOT,
        )  # (BLOCK_M, BLOCK_N) fp32: gradient of A before the gate weight
        mask = row_mask[:, None] & n_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + offs_n[None, :]
        act = tl.load(act_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        slots = tl.load(slot_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        tl.store(dgate_partial_ptr + pid_n.to(tl.int64) * num_rows + slots, tl.sum(grad * act, axis=1), mask=row_mask)
        pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + rows, mask=row_mask, other=0.0)
        dpre = grad * gate[:, None] * _activation_grad(pre, ACTIVATION)
        tl.store(dpre_ptr + offs, dpre.to(dpre_ptr.dtype.element_ty), mask=mask)

    @_autotune(_GROUP_CONFIGS, key=["N", "K"])
    @triton.jit
    def _group_xt_dy_kernel(
        dy_ptr,  # (R_dy, N) output-side gradient rows: tokens (GATHER_DY) or grouped rows
        dy_rows_ptr,  # (S,) int32 row of dy read by each grouped row, if GATHER_DY
        gate_ptr,  # (S,) fp32 grouped gate weights scaling dy, if GATE
        x_ptr,  # (R_x, K) input-side rows: tokens (GATHER_X) or grouped rows
        x_rows_ptr,  # (S,) int32 row of x read by each grouped row, if GATHER_X
        offsets_ptr,  # (E + 1,) int32
        dw_ptr,  # (E, N, K) out
        db_ptr,  # (E, N) out
        N,
        K,
        GATHER_DY: tl.constexpr,
        GATE: tl.constexpr,
        GATHER_X: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """dW[e] = dY_e^T @ X_e and db[e] = sum of the rows of dY_e (rows of expert e; zero if it has none)."""
        pid_tile = tl.program_id(0)
        expert = tl.program_id(1)
        num_k_tiles = tl.cdiv(K, BLOCK_K)
        offs_n = (pid_tile // num_k_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = (pid_tile % num_k_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        k_mask = offs_k < K
        start = tl.load(offsets_ptr + expert)
        end = tl.load(offsets_ptr + expert + 1)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            r_mask = rows < end
            if GATHER_DY:
                dy_rows = tl.load(dy_rows_ptr + rows, mask=r_mask, other=0).to(tl.int64)
            else:
                dy_rows = rows.to(tl.int64)
            dy_t = tl.load(
                dy_ptr + dy_rows[None, :] * N + offs_n[:, None], mask=n_mask[:, None] & r_mask[None, :], other=0.0
            )  # (BLOCK_N, BLOCK_R)
            dy_t32 = dy_t.to(tl.float32)
            if GATE:
                dy_t32 *= tl.load(gate_ptr + rows, mask=r_mask, other=0.0)[None, :]
                dy_t = dy_t32.to(dy_ptr.dtype.element_ty)
            bias_acc += tl.sum(dy_t32, axis=1)
            if GATHER_X:
                x_rows = tl.load(x_rows_ptr + rows, mask=r_mask, other=0).to(tl.int64)
            else:
                x_rows = rows.to(tl.int64)
            x = tl.load(
                x_ptr + x_rows[:, None] * K + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0
            )  # (BLOCK_R, BLOCK_K)
            if UPCAST_DOT:
                dy_t = dy_t.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(dy_t, x, acc=acc, input_precision=INPUT_PRECISION)
        expert = expert.to(tl.int64)
        dw_ptrs = dw_ptr + expert * N * K + offs_n[:, None] * K + offs_k[None, :]
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])
        # Only the first column tile of each row tile writes the bias gradient.
        if pid_tile % num_k_tiles == 0:
            tl.store(db_ptr + expert * N + offs_n, bias_acc.to(db_ptr.dtype.element_ty), mask=n_mask)


class _Routing:
    """Sorted routing of one call: grouped-order index arrays and the block table of the scatter kernels."""

    def __init__(self, top_k_index: torch.Tensor, num_experts: int, block_m: int):
        num_tokens, self.top_k = top_k_index.shape
        self.num_rows = num_tokens * self.top_k  # S
        expert_ids = top_k_index.reshape(-1)  # (S,) expert of each slot t * k + j
        sorted_experts, sort_idx = torch.sort(expert_ids, stable=True)  # (S,), (S,) slot of each grouped row
        self.grouped_slot = sort_idx.to(torch.int32)  # scatter index
        self.grouped_token = torch.div(sort_idx, self.top_k, rounding_mode="floor").to(torch.int32)  # gather index
        bounds = torch.arange(num_experts + 1, device=expert_ids.device, dtype=sorted_experts.dtype)
        offsets = torch.searchsorted(sorted_experts, bounds)  # (E + 1,) first grouped row of each expert
        self.offsets = offsets.to(torch.int32)
        # Block table: expert e owns cdiv(count_e, BLOCK_M) consecutive blocks; spare blocks get expert E.
        blocks = torch.div(offsets[1:] - offsets[:-1] + block_m - 1, block_m, rounding_mode="floor")  # (E,)
        block_end = torch.cumsum(blocks, dim=0)  # (E,)
        self.num_blocks = triton.cdiv(self.num_rows, block_m) + num_experts  # upper bound, known without a sync
        block_ids = torch.arange(self.num_blocks, device=expert_ids.device)
        block_expert = torch.searchsorted(block_end, block_ids, right=True)  # (num_blocks,) in [0, E]
        owner = block_expert.clamp(max=num_experts - 1)
        block_start = offsets[owner] + (block_ids - block_end[owner] + blocks[owner]) * block_m
        self.block_expert = block_expert.to(torch.int32)
        self.block_start = block_start.to(torch.int32)
        self.block_m = block_m


def _block_m(num_rows: int, num_experts: int) -> int:
    """Rows per scatter block: 128 when experts average at least 512 rows, else 64 (less masked waste)."""
    if _INTERPRET:
        return _INTERPRET_BLOCK
    return 128 if num_rows >= 512 * num_experts else 64


def _fixed_blocks(*names: str) -> dict[str, int]:
    """Block sizes the caller passes: none on a GPU (autotuned), fixed small ones under the interpreter."""
    return {name: _INTERPRET_BLOCK for name in names} if _INTERPRET else {}


def _dot_options(dtype: torch.dtype) -> dict[str, str | bool]:
    """`tl.dot` options: IEEE fp32 products unless torch allows TF32; bf16 upcast only under the interpreter."""
    ieee = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    return {"INPUT_PRECISION": "ieee" if ieee else "tf32", "UPCAST_DOT": _INTERPRET and dtype == torch.bfloat16}


def _scatter_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_strides: tuple[int, int, int],
    out: torch.Tensor,
    routing: _Routing,
    *,
    gather: bool,
    scatter: bool,
    bias: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    pre: torch.Tensor | None = None,
    activation: int = 0,
) -> None:
    """Launch `_scatter_matmul_kernel`: out[out_row] = gate * act(x[in_row] @ W[e] + b[e]) (see its docstring)."""
    n, k = out.shape[1], x.shape[1]
    grid = lambda meta: (routing.num_blocks, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _scatter_matmul_kernel[grid](
        x,
        weight,
        x if bias is None else bias,
        x if gate is None else gate,
        out,
        x if pre is None else pre,
        routing.grouped_token,
        routing.grouped_slot,
        routing.block_expert,
        routing.block_start,
        routing.offsets,
        weight.shape[0],
        n,
        k,
        *weight_strides,
        GATHER=gather,
        SCATTER=scatter,
        HAS_BIAS=bias is not None,
        SAVE_PRE=pre is not None,
        ACTIVATION=activation,
        GATE=gate is not None,
        **_dot_options(x.dtype),
        BLOCK_M=routing.block_m,
        **_fixed_blocks("BLOCK_N", "BLOCK_K"),
    )


def _group_xt_dy(
    dy: torch.Tensor,
    x: torch.Tensor,
    routing: _Routing,
    num_experts: int,
    *,
    gather_dy: bool,
    gather_x: bool,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert weight gradient (E, N, K) = dY_e^T X_e and bias gradient (E, N) = sum of dY_e's rows."""
    n, k = dy.shape[1], x.shape[1]
    dw = torch.empty(num_experts, n, k, device=x.device, dtype=x.dtype)
    db = torch.empty(num_experts, n, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]), num_experts)  # noqa: E731
    _group_xt_dy_kernel[grid](
        dy,
        routing.grouped_token,
        dy if gate is None else gate,
        x,
        routing.grouped_token,
        routing.offsets,
        dw,
        db,
        n,
        k,
        GATHER_DY=gather_dy,
        GATE=gate is not None,
        GATHER_X=gather_x,
        **_dot_options(x.dtype),
        **_fixed_blocks("BLOCK_N", "BLOCK_K", "BLOCK_R"),
    )
    return dw, db


def _combine(rows: torch.Tensor, num_tokens: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """(S, d) slot rows -> (T, d) sum over the k slots of each token, in fp32, deterministic."""
    if top_k == 1:
        return rows.to(dtype)
    return rows.view(num_tokens, top_k, rows.shape[1]).sum(dim=1).to(dtype)


class _TritonExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden_states: torch.Tensor,  # (T, d)
        up_proj: torch.Tensor,  # (E, f, d)
        up_proj_bias: torch.Tensor,  # (E, f)
        down_proj: torch.Tensor,  # (E, d, f)
        down_proj_bias: torch.Tensor,  # (E, d)
        top_k_weights: torch.Tensor,  # (T, k) fp32
        top_k_index: torch.Tensor,  # (T, k)
        activation: int,
        needs_grad: bool,
    ) -> torch.Tensor:
        num_tokens, hidden = hidden_states.shape
        num_experts, inter, _ = up_proj.shape
        routing = _Routing(top_k_index, num_experts, _block_m(top_k_index.numel(), num_experts))
        dtype, device = hidden_states.dtype, hidden_states.device
        gate = top_k_weights.reshape(-1)[routing.grouped_slot.long()]  # (S,) fp32 gate of each grouped row

        act = torch.empty(routing.num_rows, inter, device=device, dtype=dtype)  # (S, f) grouped A
        pre = torch.empty_like(act) if needs_grad else None  # (S, f) grouped Z
        # up_proj[e] is (f, d): as (K=d, N=f), element (k, n) sits at n * d + k.
        _scatter_matmul(
            hidden_states,
            up_proj,
            (inter * hidden, 1, hidden),
            act,
            routing,
            gather=True,
            scatter=False,
            bias=up_proj_bias,
            pre=pre,
            activation=activation,
        )
        # (S, d) gate-weighted slot rows; with k == 1 the slot rows are the output rows, written in the output dtype.
        rows = torch.empty(
            routing.num_rows, hidden, device=device, dtype=dtype if routing.top_k == 1 else torch.float32
        )
        # down_proj[e] is (d, f): as (K=f, N=d), element (k, n) sits at n * f + k.
        _scatter_matmul(
            act,
            down_proj,
            (hidden * inter, 1, inter),
            rows,
            routing,
            gather=False,
            scatter=True,
            bias=down_proj_bias,
            gate=gate,
        )
        if needs_grad:
            ctx.save_for_backward(hidden_states, up_proj, down_proj, down_proj_bias, top_k_index, gate, pre, act)
            ctx.routing = routing  # intermediate index tensors only
            ctx.activation = activation
        return _combine(rows, num_tokens, routing.top_k, dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        hidden_states, up_proj, down_proj, down_proj_bias, top_k_index, gate, pre, act = ctx.saved_tensors
        routing: _Routing = ctx.routing
        need_x, need_up_w, need_up_b, need_down_w, need_down_b, need_gate = ctx.needs_input_grad[:6]
        num_tokens, hidden = hidden_states.shape
        num_experts, inter, _ = up_proj.shape
        device, dtype = hidden_states.device, hidden_states.dtype
        grad_output = grad_output.to(dtype).contiguous()  # (T, d)
        grad_x = grad_up = grad_up_bias = grad_down = grad_down_bias = grad_gate = None

        need_pre = need_x or need_up_w or need_up_b
        if need_pre or need_gate:
            block_n = _INTERPRET_BLOCK if _INTERPRET else _ACT_GRAD_BLOCK_N
            num_n_blocks = triton.cdiv(inter, block_n)
            grad_pre = torch.empty_like(pre)  # (S, f) grouped dZ
            dgate_partial = torch.empty(num_n_blocks, routing.num_rows, device=device, dtype=torch.float32)
            # down_proj[e] is (d, f): as (K=d, N=f), element (k, n) sits at k * f + n.
            _scatter_matmul_act_grad_kernel[(routing.num_blocks, num_n_blocks)](
                grad_output,
                down_proj,
                pre,
                act,
                gate,
                grad_pre,
                dgate_partial,
                routing.grouped_token,
                routing.grouped_slot,
                routing.block_expert,
                routing.block_start,
                routing.offsets,
                num_experts,
                routing.num_rows,
                inter,
                hidden,
                hidden * inter,
                inter,
                1,
                ACTIVATION=ctx.activation,
                **_dot_options(dtype),
                BLOCK_M=routing.block_m,
                BLOCK_N=block_n,
                **_fixed_blocks("BLOCK_K"),
            )
            if need_gate:
                # dgate[t, j] = <G, A> + <dOut[t], b_down[e]>, e = top_k_index[t, j]
                with torch.autocast(device.type, enabled=False):
                    bias_term = (grad_output.float() @ down_proj_bias.float().T).gather(1, top_k_index)  # (T, k)
                grad_gate = dgate_partial.sum(dim=0).view(num_tokens, routing.top_k) + bias_term
        if need_down_w or need_down_b:
            grad_down, grad_down_bias = _group_xt_dy(
                grad_output, act, routing, num_experts, gather_dy=True, gather_x=False, gate=gate
            )
        if need_up_w or need_up_b:
            grad_up, grad_up_bias = _group_xt_dy(
                grad_pre, hidden_states, routing, num_experts, gather_dy=False, gather_x=True
            )
        if need_x:
            rows = torch.empty(
                routing.num_rows, hidden, device=device, dtype=dtype if routing.top_k == 1 else torch.float32
            )  # (S, d) slot rows of dx
            # up_proj[e] is (f, d): as (K=f, N=d), element (k, n) sits at k * d + n.
            _scatter_matmul(grad_pre, up_proj, (inter * hidden, hidden, 1), rows, routing, gather=False, scatter=True)
            grad_x = _combine(rows, num_tokens, routing.top_k, dtype)
        return grad_x, grad_up, grad_up_bias, grad_down, grad_down_bias, grad_gate, None, None, None


@torch.compiler.disable
def triton_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`MoGEExperts` forward with the fused Triton kernels, with the signature of transformers' experts functions.

    hidden_states `(T, d)`, top_k_index `(T, k)` expert ids in `[0, num_experts)`, top_k_weights `(T, k)`; returns
    `(T, d)` in `hidden_states.dtype`: `sum_j w[t, j] * (act(x[t] @ up[e].T + b_up[e]) @ down[e].T + b_down[e])`.
    Differentiable in the hidden states, the four expert tensors and the weights. Under autocast the expert math runs
    in the autocast dtype. Raises ValueError for an activation the kernels do not fuse (the caller can fall back).
    """
    if triton is None:
        raise ImportError("triton_experts_forward needs triton (`pip install triton`)")
    if self.activation not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"triton_experts_forward does not fuse the activation {self.activation!r}; "
            f"supported: {', '.join(sorted(SUPPORTED_ACTIVATIONS))}"
        )
    if not (_INTERPRET or hidden_states.is_cuda):
        raise RuntimeError("triton_experts_forward needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = hidden_states.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"triton_experts_forward supports float32, bfloat16 and float16, got {dtype}")
    tensors = (
        hidden_states.reshape(-1, hidden_states.shape[-1]),
        self.up_proj,
        self.up_proj_bias,
        self.down_proj,
        self.down_proj_bias,
    )
    tensors = tuple(tensor.to(dtype).contiguous() for tensor in tensors)
    needs_grad = torch.is_grad_enabled() and any(
        tensor.requires_grad for tensor in (*tensors, top_k_weights)
    )  # else the pre-activation is not stored
    out = _TritonExpertsFunction.apply(
        *tensors,
        top_k_weights.float().contiguous(),
        top_k_index.long().contiguous(),
        SUPPORTED_ACTIVATIONS[self.activation],
        needs_grad,
    )
    return out.to(hidden_states.dtype)
