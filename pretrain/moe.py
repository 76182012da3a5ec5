"""Mixture-of-experts feed-forward: token-choice top-k routing, dropless, aux-loss-free balance.

Shape legend: N tokens, D width, H expert hidden width, E routed experts, K experts per token
(top-k), M = N*K token-expert assignments.

Why this design:

- **Dropless.** Every token reaches its K experts (no capacity factor): EEG batches mix
  montages and tasks, so a token dropped because its expert was full would make the loss
  depend on what else is in the batch. Assignments are sorted by expert so each expert runs
  once on a contiguous slice.
- **Stacked expert weights** (``w_in [E, D, 2H]``, ``w_out [E, H, D]``), so the per-expert
  loop can be swapped for one grouped GEMM (``torch.nn.functional.grouped_mm``) without
  touching checkpoints. The loop stays as the portable path (CUDA fp32, old PyTorch).
- **Balance without an auxiliary loss** (DeepSeek-V3): a per-expert bias is added to the
  routing scores for expert *selection only*; the gate values that scale the expert outputs
  come from the unbiased scores, so balancing does not bias the function the layer computes.
  The bias is a buffer, never touched by the optimizer: the trainer calls
  :meth:`MoE.update_bias` after its optimizer step with token counts (all-reduced across
  data-parallel ranks), so every rank applies the same update and replicas stay identical.
- **Sigmoid gates by default**, normalised over the K selected experts (DeepSeek-V3). A
  sigmoid score depends on its own expert only, so adding a bias to one expert does not
  shift the others' scores the way it would under softmax. With K=1 the normalised gate
  would be the constant 1 and the router would get no gradient, so K=1 keeps the raw score.
  ``gate="softmax"`` (Switch/Mixtral style) is available for comparison.
- **SwiGLU experts**: the usual choice at equal parameter count; gate and up projections
  are fused into one ``[E, D, 2H]`` tensor so each expert is two GEMMs.
- Router maths runs in float32 whatever the model dtype: top-k on bf16 scores ties often
  and the bias updates (1e-3 steps) would vanish in bf16. :meth:`MoE._apply` keeps the bias
  float32 even through ``model.bfloat16()`` (which DeepSpeed's bf16 mode calls).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATES = ("sigmoid", "softmax")
BACKENDS = ("auto", "grouped_mm", "loop")


def swiglu(h: Tensor) -> Tensor:
    """`h [..., 2H]` (gate and up halves) -> `[..., H]`."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP: the dense variant's feed-forward and the MoE's shared expert(s)."""

    def __init__(self, dim: int, hidden: int, out_std: float = 0.02):
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)  # fused gate+up
        self.w_out = nn.Linear(hidden, dim, bias=False)
        nn.init.trunc_normal_(self.w_in.weight, std=0.02)
        nn.init.trunc_normal_(self.w_out.weight, std=out_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(swiglu(self.w_in(x)))


def _grouped_mm_ok(x: Tensor) -> bool:
    """Whether ``F.grouped_mm`` runs for this input (CPU fp32/bf16; CUDA bf16 on SM >= 80)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        # compiled, the op's shape check wants bf16 even where eager CPU runs fp32
        if torch.compiler.is_compiling():
            return x.dtype == torch.bfloat16
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


class _Dispatch(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward is a gather too, never a scatter.

    Routing moves rows by known permutations: each token to its K experts' slices and the
    experts' rows back. Autograd's backward of a gather is an accumulating scatter
    (index_put), which on CPU cost a sixth of the MoE layer's step; here the backward reads
    the gradient through ``back`` (the inverse move) and sums each token's K copies. Gathers
    only: deterministic on every device, bit-identical to the scatter.
    ``x [N, D]``, ``index [N*k]`` -> ``[N*k, D]``; ``back [N*k]`` with
    ``index[back].view(N, k) == arange(N)[:, None]``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, back: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(back)
        ctx.k, ctx.n = k, x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (back,) = ctx.saved_tensors
        grad = grad.index_select(0, back)  # [N*k, D], token-major
        if ctx.k > 1:
            grad = grad.view(ctx.n, ctx.k, -1).sum(1)
        return grad, None, None, None


class MoE(nn.Module):
    """Token-choice top-k MoE feed-forward with optional shared expert(s).

    ``forward(x [..., D], valid [...] | None) -> (y [..., D], aux_loss [], counts [E])``.
    Only valid tokens are routed, run and counted: padding costs no expert compute and does
    not skew the load statistics; invalid tokens get the zero vector (their residual stream
    passes through unchanged).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        n_experts: int,
        top_k: int,
        n_shared: int = 0,
        gate: str = "sigmoid",
        bias_update_rate: float = 1e-3,
        aux_loss_coef: float = 0.0,
        backend: str = "auto",
        out_std: float = 0.02,
    ):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"need 1 <= top_k <= n_experts, got top_k={top_k}, E={n_experts}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.dim, self.hidden = dim, hidden
        self.n_experts, self.top_k = n_experts, top_k
        self.gate, self.backend = gate, backend
        self.bias_update_rate = bias_update_rate
        self.aux_loss_coef = aux_loss_coef

        self.router = nn.Linear(dim, n_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(n_experts, dim, 2 * hidden))  # [E, D, 2H]
        self.w_out = nn.Parameter(torch.empty(n_experts, hidden, dim))  # [E, H, D]
        nn.init.trunc_normal_(self.router.weight, std=0.02)
        nn.init.trunc_normal_(self.w_in, std=0.02)
        nn.init.trunc_normal_(self.w_out, std=out_std)
        self.shared = SwiGLU(dim, n_shared * hidden, out_std) if n_shared > 0 else None

        # Selection-only bias, saved with the model (from_pretrained must route identically).
        self.register_buffer("router_bias", torch.zeros(n_experts, dtype=torch.float32))
        # Assignments per expert since the last reset_counts(), added by record() (the encoder
        # calls it after each training forward, outside activation checkpointing so a
        # recomputed forward is not counted twice). int64: exact, and model.bfloat16() leaves
        # it alone. Not saved.
        self.register_buffer("counts", torch.zeros(n_experts, dtype=torch.int64), persistent=False)
        self.last_counts: Tensor | None = None  # [E] assignments of the last forward

    @property
    def params_per_expert(self) -> int:
        return 3 * self.dim * self.hidden

    def _apply(self, fn, recurse=True):
        bias = self._buffers["router_bias"]
        super()._apply(fn, recurse)
        moved = self._buffers["router_bias"]
        if moved is not None and moved.dtype != torch.float32:
            # restore the float32 values, not a round trip through bf16 (0.06 -> 0.0601)
            self._buffers["router_bias"] = bias.to(moved.device, torch.float32)
        return self

    # ---- routing -------------------------------------------------------------------------

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`x [N, D]` -> (expert ids `[N, K]`, gates `[N, K]` fp32, probs `[N, E]` fp32).

        ``probs`` (scores normalised over all experts) only feed the Switch auxiliary loss.
        """
        logits = F.linear(x.float(), self.router.weight.float())  # [N, E]
        if self.gate == "sigmoid":
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-9)
        else:
            scores = probs = logits.softmax(-1)
        idx = torch.topk(scores + self.router_bias, self.top_k, dim=-1, sorted=False).indices
        gates = scores.gather(-1, idx)  # [N, K]
        if self.top_k > 1:
            gates = gates / gates.sum(-1, keepdim=True).clamp_min(1e-9)
        return idx, gates, probs

    # ---- expert computation --------------------------------------------------------------

    def _experts_loop(self, xs: Tensor, counts: Tensor) -> Tensor:
        """`xs [M, D]` sorted by expert, `counts [E]` -> `[M, D]`; one GEMM pair per expert."""
        outs = []
        start = 0
        for e, n in enumerate(counts.tolist()):  # host sync: fine on CPU, avoided by grouped_mm
            if n == 0:
                continue
            h = swiglu(xs[start : start + n] @ self.w_in[e].to(xs.dtype))
            outs.append(h @ self.w_out[e].to(xs.dtype))
            start += n
        if not outs:
            return xs.new_zeros(0, self.dim)
        return torch.cat(outs)

    def _experts_grouped(self, xs: Tensor, counts: Tensor) -> Tensor:
        """Same as the loop as two grouped GEMMs, with no host sync on the counts."""
        offs = counts.cumsum(0).to(torch.int32)  # end of each expert's slice
        h = swiglu(F.grouped_mm(xs, self.w_in.to(xs.dtype), offs=offs))  # [M, H]
        return F.grouped_mm(h, self.w_out.to(xs.dtype), offs=offs)  # [M, D]

    def _experts_dense(self, x: Tensor, idx: Tensor, gates: Tensor) -> Tensor:
        """Every expert on every token, combined with the sparse gates: static shapes only,
        for the meta device (shape checks of models too large to allocate)."""
        h = swiglu(torch.einsum("nd,edh->enh", x, self.w_in))  # [E, N, H]
        y = torch.einsum("enh,ehd->end", h, self.w_out)  # [E, N, D]
        dense = torch.zeros(x.shape[0], self.n_experts, dtype=y.dtype, device=x.device)
        dense = dense.scatter(1, idx, gates.to(y.dtype))  # [N, E]
        return torch.einsum("end,ne->nd", y, dense)

    def _use_grouped(self, x: Tensor) -> bool:
        if self.backend == "loop":
            return False
        if self.backend == "grouped_mm":
            return True
        return _grouped_mm_ok(x)

    def _routed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`x [N, D]` (valid tokens) -> (routed output `[N, D]`, aux loss `[]`, counts `[E]`)."""
        n_tok, k = x.shape[0], self.top_k
        idx, gates, probs = self.route(x)  # [N, K], [N, K], [N, E]
        flat = idx.reshape(-1)  # [M] expert of each assignment
        counts = torch.zeros(self.n_experts, dtype=torch.int64, device=x.device)
        counts = counts.scatter_add(0, flat, torch.ones_like(flat))  # [E]

        if self.aux_loss_coef > 0 and n_tok > 0:
            # Switch loss, top-k form: E * sum_e (share of assignments to e) * (mean prob of e).
            share = counts.float() / (n_tok * k)
            aux = self.aux_loss_coef * self.n_experts * (share * probs.mean(0)).sum()
        else:
            aux = x.new_zeros((), dtype=torch.float32)

        if x.is_meta:
            return self._experts_dense(x, idx, gates), aux, counts

        order = torch.argsort(flat, stable=True)  # [M] assignments grouped by expert
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        xs = _Dispatch.apply(x, order // k, inverse, k)  # [M, D]; each token once per expert
        if n_tok == 0:
            ys = xs
        elif self._use_grouped(x):
            ys = self._experts_grouped(xs, counts)
        else:
            ys = self._experts_loop(xs, counts)
        ys = _Dispatch.apply(ys, inverse, order, 1).view(n_tok, k, self.dim)  # back to [N, K, D]
        y = (ys * gates.to(ys.dtype).unsqueeze(-1)).sum(1)  # [N, D]
        return y, aux, counts

    def forward(self, x: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        shape = x.shape
        x = x.reshape(-1, self.dim)  # [N, D]
        if valid is None or x.is_meta:  # meta: no data-dependent shapes, route everything
            y, aux, counts = self._routed(x)
            if self.shared is not None:
                y = y + self.shared(x)
        else:
            keep = valid.reshape(-1).nonzero().squeeze(1)  # [N_valid]
            xv = x[keep]
            yv, aux, counts = self._routed(xv)
            if self.shared is not None:
                yv = yv + self.shared(xv)
            y = x.new_zeros(x.shape).index_copy(0, keep, yv.to(x.dtype))
        counts = counts.detach()
        self.last_counts = counts
        return y.view(shape), aux, counts

    # ---- load balancing ------------------------------------------------------------------

    @torch.no_grad()
    def update_bias(self, counts: Tensor | None = None, rate: float | None = None) -> Tensor:
        """Nudge the selection bias toward uniform load: ``bias += rate * sign(mean - load)``.

        Why a separate call: the bias must change identically on every data-parallel rank,
        so the trainer passes counts summed over ranks (and over gradient-accumulation
        micro-batches), after the optimizer step. ``counts`` defaults to this rank's
        :attr:`counts` accumulator. The accumulator is reset either way (its counts have been
        consumed). Returns the counts used.
        """
        if counts is None:
            counts = self.counts.clone()
        self.reset_counts()
        load = counts.to(self.router_bias.device, torch.float32)
        rate = self.bias_update_rate if rate is None else rate
        self.router_bias += rate * torch.sign(load.mean() - load)
        return counts

    @torch.no_grad()
    def record(self, counts: Tensor) -> None:
        """Add one forward's `counts [E]` to the accumulator the bias update reads."""
        self.counts += counts.to(self.counts.device, torch.int64)

    @torch.no_grad()
    def reset_counts(self) -> None:
        self.counts.zero_()


def load_imbalance(counts: Tensor) -> Tensor:
    """`counts [..., E]` -> max load / mean load `[...]` (1 = perfectly balanced)."""
    counts = counts.float()
    return counts.max(-1).values / counts.mean(-1).clamp_min(1e-9)
