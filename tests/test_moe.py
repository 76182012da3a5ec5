"""MoE feed-forward: top-k routing, dropless equality with a per-token reference, balancing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pretrain.encoder import Encoder
from pretrain.encoder_config import get_config
from pretrain.moe import MoE, load_imbalance, swiglu

D, H, E = 16, 24, 6
BACKENDS = ["loop"] + (["grouped_mm"] if hasattr(F, "grouped_mm") else [])


def make_moe(**kw) -> MoE:
    torch.manual_seed(0)
    args = dict(dim=D, hidden=H, n_experts=E, top_k=2, n_shared=1)
    args.update(kw)
    return MoE(**args)


def reference(moe: MoE, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Token by token, expert by expert: what the dropless layer must equal."""
    idx, gates, _ = moe.route(x)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        if valid is not None and not valid[n]:
            continue
        y = torch.zeros(D)
        for k in range(moe.top_k):
            e = int(idx[n, k])
            y = y + gates[n, k] * (swiglu(x[n] @ moe.w_in[e]) @ moe.w_out[e])
        if moe.shared is not None:
            y = y + moe.shared(x[n])
        out[n] = y
    return out


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_routing_picks_k_distinct_experts(gate, k):
    moe = make_moe(gate=gate, top_k=k)
    x = torch.randn(64, D)
    idx, gates, probs = moe.route(x)
    assert idx.shape == gates.shape == (64, k)
    assert probs.shape == (64, E)
    assert all(len(set(row.tolist())) == k for row in idx)
    assert ((idx >= 0) & (idx < E)).all()
    assert (gates > 0).all()
    if k > 1:  # renormalised over the selected experts
        torch.testing.assert_close(gates.sum(-1), torch.ones(64))
    else:  # K=1 keeps the raw score, else the router would get no gradient
        assert (gates < 1).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(64))
    # The chosen experts are the top-k of score + bias.
    moe.router_bias[:] = torch.tensor([5.0, 0, 0, 0, 0, 0])
    idx, _, _ = moe.route(x)
    assert (idx == 0).any(-1).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
@pytest.mark.parametrize("n_shared", [0, 1])
def test_dropless_equals_per_token_reference(backend, gate, n_shared):
    moe = make_moe(backend=backend, gate=gate, n_shared=n_shared)
    x = torch.randn(2, 40, D)  # [B, N, D]
    valid = torch.rand(2, 40) > 0.3
    y, aux, counts = moe(x, valid)
    assert y.shape == x.shape
    ref = reference(moe, x.reshape(-1, D), valid.reshape(-1)).view_as(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    # Every valid token was processed (no capacity drop): its output is not the zero vector.
    assert (y[valid].abs().sum(-1) > 0).all()
    assert (y[~valid] == 0).all()
    assert int(counts.sum()) == int(valid.sum()) * moe.top_k


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropless_when_experts_are_empty_or_overloaded(backend):
    """All tokens forced onto two experts: no capacity limit, the others get nothing."""
    moe = make_moe(backend=backend, n_shared=0)
    moe.router_bias[:] = torch.tensor([0.0, 10.0, 0.0, 10.0, 0.0, 0.0])
    x = torch.randn(50, D)
    y, _, counts = moe(x)
    assert counts.tolist() == [0, 50, 0, 50, 0, 0]
    torch.testing.assert_close(y, reference(moe, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_gradients_equal_per_token_reference(backend, k):
    """Routing moves rows with gathers whose backward is hand-written (pretrain.moe._Dispatch):
    the input's and every weight's gradient must equal autograd's through the reference."""
    x = torch.randn(2, 25, D)
    valid = torch.rand(2, 25) > 0.2
    weight = torch.linspace(-1, 1, D)
    grads = []
    for run in ("layer", "reference"):
        moe = make_moe(backend=backend, top_k=k)
        with torch.no_grad():  # experts at 0.02 init barely reach x's gradient: make them count
            for w in (moe.w_in, moe.w_out, moe.router.weight):
                w.mul_(25)
        xi = x.clone().requires_grad_()
        if run == "layer":
            y, _, _ = moe(xi, valid)
        else:
            y = reference(moe, xi.reshape(-1, D), valid.reshape(-1)).view_as(xi)
        (y * weight).pow(2).sum().backward()
        grads.append([xi.grad] + [p.grad for p in moe.parameters()])
    for a, b in zip(*grads, strict=True):  # float32 summation order differs: ~1e-5 of ~0.1
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_backends_agree_on_outputs_and_gradients():
    if len(BACKENDS) < 2:
        pytest.skip("torch.nn.functional.grouped_mm not available")
    base = make_moe(backend="loop")
    x = torch.randn(30, D)
    grads = []
    for backend in BACKENDS:
        moe = copy.deepcopy(base)
        moe.backend = backend
        xi = x.clone().requires_grad_()
        y, _, _ = moe(xi)
        (y * torch.linspace(-1, 1, D)).sum().backward()
        grads.append((y.detach(), xi.grad, moe.w_in.grad, moe.w_out.grad, moe.router.weight.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_dense_path_used_on_meta_matches_loop():
    """The static-shape path (meta device) computes the same function."""
    moe = make_moe(n_shared=0)
    x = torch.randn(20, D)
    idx, gates, _ = moe.route(x)
    torch.testing.assert_close(moe._experts_dense(x, idx, gates), moe(x)[0], atol=1e-5, rtol=1e-4)
    with torch.device("meta"):
        meta = MoE(D, H, E, 2, n_shared=1)
    y, aux, counts = meta(torch.empty(3, 7, D, device="meta"), torch.ones(3, 7, dtype=torch.bool))
    assert y.shape == (3, 7, D) and counts.shape == (E,)


def test_router_gets_gradient_through_gates():
    for k in (1, 2):
        moe = make_moe(top_k=k)
        y, _, _ = moe(torch.randn(32, D))
        y.pow(2).sum().backward()
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
        assert moe.router_bias.grad is None  # the bias is not trained


def test_tokens_per_expert_sum_to_tokens_times_k():
    moe = make_moe(top_k=3)
    x = torch.randn(4, 25, D)
    valid = torch.ones(4, 25, dtype=torch.bool)
    valid[1, 10:] = False
    _, _, counts = moe(x, valid)
    assert counts.shape == (E,) and counts.dtype == torch.int64
    assert int(counts.sum()) == int(valid.sum()) * 3
    assert torch.equal(moe.last_counts, counts)

    # Encoder level: one row per MoE layer, each summing to valid tokens * K.
    torch.manual_seed(0)
    enc = Encoder(get_config("tiny"))
    batch = {
        "eeg": torch.randn(2, 5, 800) * 20,
        "channel_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2]).bool(),
    }
    out = enc(batch)
    cfg = enc.config
    assert out.expert_counts.shape == (cfg.depth, cfg.n_experts)
    n_valid = int(out.valid.sum())
    assert out.expert_counts.sum(1).tolist() == [n_valid * cfg.top_k] * cfg.depth
    assert torch.equal(enc.last_expert_counts, out.expert_counts)


def skewed_tokens(n: int = 512) -> torch.Tensor:
    """Tokens sharing one strong direction (what a collapsed router sees)."""
    g = torch.Generator().manual_seed(1)
    return 2.0 * torch.ones(n, D) / D**0.5 + 0.3 * torch.randn(n, D, generator=g)


def test_bias_update_moves_load_toward_uniform():
    moe = make_moe(n_shared=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a diverse router, skewed toward experts 0 and 1
        moe.router.weight.copy_(torch.randn(E, D, generator=g) / D**0.5)
        moe.router.weight[:2] += 1.5 * torch.ones(2, D) / D**0.5
    x = torch.ones(512, D) / D**0.5 + torch.randn(512, D, generator=g)
    loads = []
    for _ in range(60):
        _, _, counts = moe(x)
        loads.append(load_imbalance(counts).item())
        moe.update_bias(counts, rate=0.02)
    assert loads[0] > 2.0  # expert 1 takes > 2x its share
    late = loads[-10:]
    assert sum(late) / len(late) < 1.3, loads
    assert moe.router_bias[:2].max() < 0 < moe.router_bias[2:].min()
    # The gates (what scales expert outputs) ignore the bias: only the selection moved.
    idx, gates, _ = moe.route(x)
    scores = torch.sigmoid(x @ moe.router.weight.T)
    torch.testing.assert_close(gates, scores.gather(-1, idx) / scores.gather(-1, idx).sum(-1, True))


def test_bias_changes_only_when_asked():
    """Forwards never touch the bias: the trainer decides when (after the optimizer step)."""
    moe = make_moe()
    moe.train()
    x = skewed_tokens(64)
    for _ in range(3):
        _, _, counts = moe(x)
        moe.record(counts)
    assert (moe.router_bias == 0).all()
    assert torch.equal(moe.counts, 3 * counts)
    used = moe.update_bias()  # defaults to the accumulated counts, then resets them
    assert torch.equal(used, 3 * counts)
    assert (moe.counts == 0).all()
    expected = 1e-3 * torch.sign(used.float().mean() - used.float())
    torch.testing.assert_close(moe.router_bias, expected)


def test_data_parallel_ranks_stay_identical_with_all_reduced_counts():
    """Two replicas see different data; updating both with the summed counts (what an
    all-reduce gives) keeps their biases equal, and training forwards feed the counts."""
    torch.manual_seed(0)
    rank0 = Encoder(get_config("tiny"))
    rank1 = copy.deepcopy(rank0)
    for model in (rank0, rank1):
        model.train()
    for step in range(3):
        local = []
        for seed, model in ((step, rank0), (100 + step, rank1)):
            g = torch.Generator().manual_seed(seed)
            for _ in range(2):  # two micro-batches (gradient accumulation)
                model(torch.randn(2, 6, 800, generator=g) * 30)
            local.append(model.routing_counts())
        assert not torch.equal(local[0], local[1])
        total = local[0] + local[1]  # dist.all_reduce(counts, op=SUM)
        assert int(total.sum()) == 2 * 2 * 2 * 6 * 4 * 2 * 2  # ranks*micro*B*C*P*K*layers
        for model in (rank0, rank1):
            model.update_router_bias(total)
            assert int(model.routing_counts().sum()) == 0
    for a, b in zip(rank0.moe_layers(), rank1.moe_layers(), strict=True):
        assert torch.equal(a.router_bias, b.router_bias)
        assert a.router_bias.abs().sum() > 0


def test_activation_checkpointing_does_not_double_count():
    torch.manual_seed(0)
    enc = Encoder(get_config("tiny", activation_checkpointing=True)).train()
    out = enc(torch.randn(2, 4, 800) * 30)
    (out.tokens.sum() + out.aux_loss).backward()  # recomputes the blocks
    assert torch.equal(enc.routing_counts(), out.expert_counts)


def test_aux_loss_is_sane():
    x = torch.randn(256, D)
    off = make_moe(aux_loss_coef=0.0)
    assert off(x)[1].item() == 0.0

    moe = make_moe(aux_loss_coef=1.0, gate="softmax")
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities: the loss is at its floor, 1
    assert moe(x)[1].item() == pytest.approx(1.0, abs=1e-5)

    for gate in ("sigmoid", "softmax"):
        moe = make_moe(aux_loss_coef=1.0, gate=gate)
        xr = x.clone().requires_grad_()
        aux = moe(xr)[1]
        assert 0.9 < aux.item() < 1.5  # near-uniform random router
        aux.backward()
        assert moe.router.weight.grad.abs().sum() > 0

        with torch.no_grad():  # collapse: everything to experts 0 and 1
            moe.router.weight[:2] = 4.0 * torch.ones(2, D) / D**0.5
        skewed = moe(skewed_tokens())[1].item()
        assert 1.5 < skewed <= E

    coef = make_moe(aux_loss_coef=0.01)
    assert coef(x)[1].item() == pytest.approx(0.01 * make_moe(aux_loss_coef=1.0)(x)[1].item())


def test_router_bias_stays_float32_in_bf16():
    moe = make_moe(backend="loop").bfloat16()
    assert moe.w_in.dtype == torch.bfloat16
    assert moe.router_bias.dtype == torch.float32
    moe.update_bias(torch.tensor([10, 0, 0, 0, 0, 0]), rate=1e-3)
    assert moe.router_bias[1].item() == pytest.approx(1e-3)  # would round away in bf16 at 1.0
    for backend in BACKENDS:
        moe.backend = backend
        y, _, _ = moe(torch.randn(10, D, dtype=torch.bfloat16))
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    # a trained bias keeps its exact float32 values through a cast (not rounded via bf16)
    moe.router_bias.copy_(torch.tensor([0.06, -0.02, 0.0013, 0.0, 0.5, -0.1]))
    before = moe.router_bias.clone()
    assert torch.equal(moe.float().bfloat16().router_bias, before)


def test_state_dict_holds_bias_not_counts():
    moe = make_moe()
    keys = set(moe.state_dict())
    assert "router_bias" in keys and "counts" not in keys
    assert {"w_in", "w_out", "router.weight"} <= keys
    assert moe.w_in.shape == (E, D, 2 * H) and moe.w_out.shape == (E, H, D)
