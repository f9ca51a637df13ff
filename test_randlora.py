"""Tests that read like the paper's claims. Float64 wherever exactness is the point; the
oracle for eq. 4 is the literal loop over b with explicit diagonal matrices."""
import copy
import functools
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import demo_toy
import randlora as R

FAST = settings(max_examples=25, deadline=None)
dims = st.integers(2, 24)
DENSE = ("uniform", "normal")


def mlp(i, h, o, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Linear(h, o)).to(dtype)


def randomise(model, seed=1):
    """Random non-zero lam, gam (and LoRA factors) so the update is generic."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for u, _ in R.adapters(model).values():
            for p in R._trainables(u).values():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) + 0.5)


def oracle_delta(u):
    """s * sum_b B_b diag(lam_b) A diag(gam_b), transposed when in > out: eq. 4 literally."""
    A, B = (t.double() for t in u.bases())
    U = sum(B[b] @ torch.diag(u.lam[b].double()) @ A @ torch.diag(u.gam[b].double()) for b in range(u.n))
    dw = u.scale * (U.T if u.transposed else U)                              # (out, in)
    return dw.T if u.fan_in_fan_out else dw


def rank(M):
    return int(torch.linalg.matrix_rank(M.double()))


# --------------------------------------------------------------------------- eq. 4 and rank


@FAST
@given(i=dims, o=dims, r=st.integers(1, 8), seed=st.integers(0, 2**16), basis=st.sampled_from(DENSE))
def test_update_is_full_rank_while_lora_is_rank_r(i, o, r, seed, basis):
    r = min(r, i, o)
    model = nn.Sequential(nn.Linear(i, o).double())
    R.add_randlora(model, "0", r, 1.0, basis=basis, seed=seed)
    randomise(model, seed)
    assert rank(model[0].delta_weight()) == min(i, o)
    lora = nn.Sequential(nn.Linear(i, o).double())
    R.add_lora(lora, "0", r, 1.0, seed=seed)
    randomise(lora, seed)
    assert rank(lora[0].delta_weight()) <= r


@FAST
@given(i=dims, o=dims, r=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_vectorised_delta_equals_literal_sum_of_eq4(i, o, r, seed):
    r = min(r, i, o)
    model = mlp(i, o, i)                                                     # both orientations
    R.add_randlora(model, ["0", "2"], r, 3.0, seed=seed)
    randomise(model, seed)
    for u, w in R.adapters(model).values():
        assert u.n == math.ceil(min(w.shape) / r) and u.delta_weight().shape == w.shape
        torch.testing.assert_close(u.delta_weight(), oracle_delta(u), rtol=1e-12, atol=1e-12)


def test_initial_gam_makes_stacked_update_rank_r():
    """At init every gam_b = 1/k, so sum_b B_b diag(lam_b) A diag(gam_b) = (sum_b ..) A / k has
    rank <= r however lam is set: training must separate the gam_b to reach full rank."""
    model = nn.Sequential(nn.Linear(12, 20).double())
    R.add_randlora(model, "0", 3, 1.0)
    with torch.no_grad():
        model[0].lam.normal_()
    assert rank(model[0].delta_weight()) == 3


# --------------------------------------------------------------------------- forward, merge


@FAST
@given(i=dims, o=dims, r=st.integers(1, 6), T=st.integers(1, 9), seed=st.integers(0, 999))
def test_merge_equivalence(i, o, r, T, seed):
    r = min(r, i, o)
    model = nn.Sequential(nn.Linear(i, o).double())
    W = model[0].weight.detach().clone()
    R.add_randlora(model, "0", r, 2.0, seed=seed)
    randomise(model, seed)
    x = torch.randn(3, T, i, dtype=torch.float64)
    layer = model[0]
    patched = model(x)
    explicit = F.linear(x, W + layer.delta_weight(), layer.bias)
    assert R.merge(model) == 1 and R.merge(model) == 0                    # idempotent
    merged = model(x)
    torch.testing.assert_close(patched, explicit)
    torch.testing.assert_close(merged, explicit)
    assert R.unmerge(model) == 1 and R.unmerge(model) == 0
    torch.testing.assert_close(layer.weight, W, rtol=0, atol=1e-12)


def test_zero_init_patched_model_equals_base_model():
    base = mlp(10, 30, 7, dtype=torch.float32)
    x = torch.randn(4, 10)
    for add in (lambda m: R.add_randlora(m, ["0", "2"], 4, 8.0), lambda m: R.add_lora(m, ["0", "2"], 4, 8.0)):
        m = copy.deepcopy(base)
        add(m)
        assert torch.equal(m(x), base(x))


def test_dropout_only_touches_the_update_branch():
    model = mlp(8, 16, 8)
    R.add_randlora(model, ["0", "2"], 4, 1.0, dropout=0.5)
    randomise(model)
    x = torch.randn(5, 8, dtype=torch.float64)
    model.eval()
    y_eval = model(x)
    R.merge(model)
    torch.testing.assert_close(model(x), y_eval)                          # eval: no dropout at all
    R.unmerge(model)
    model.train()
    torch.manual_seed(0)
    y_train = model[0](x)
    torch.manual_seed(0)
    mask_x = F.dropout(x, 0.5, True)
    torch.testing.assert_close(y_train, F.linear(x, model[0].weight, model[0].bias)
                               + F.linear(mask_x, model[0].delta_weight()))


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: weight stored (in, out), y = x W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(nf, dtype=torch.float64))

    def forward(self, x):
        return x @ self.weight + self.bias


@pytest.mark.parametrize("nx,nf", [(6, 18), (18, 6)])
def test_conv1d_is_adapted_in_its_own_layout(nx, nf):
    model = nn.Sequential(Conv1D(nf, nx))
    W = model[0].weight.detach().clone()                                  # (in, out)
    R.add_randlora(model, "0", 4, 2.0)
    randomise(model)
    layer = model[0]
    assert layer.delta_weight().shape == (nx, nf)
    torch.testing.assert_close(layer.delta_weight(), oracle_delta(layer))
    x = torch.randn(5, nx, dtype=torch.float64)
    torch.testing.assert_close(model(x), x @ (W + layer.delta_weight()) + layer.bias)


def test_target_parameters_adapt_multihead_attention_and_merge():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).double()
    model = nn.ModuleDict({"attn": mha})
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    names = R.add_randlora(model, [], 4, 1.0, target_parameters="in_proj_weight")
    assert names == ["attn.in_proj_weight"]
    randomise(model)
    u, w = R.adapters(model)["attn.in_proj_weight"]
    y = mha(x, x, x, need_weights=False)[0]
    y.square().sum().backward()
    assert u.lam.grad.abs().min() > 0 and u.gam.grad.abs().min() > 0
    R.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], y)


# --------------------------------------------------------------------------- parameters


@FAST
@given(sizes=st.lists(st.tuples(dims, dims), min_size=1, max_size=4), r=st.integers(1, 5))
def test_trainable_count_is_sum_of_n_times_r_plus_k(sizes, r):
    r = min([r] + [min(s) for s in sizes])
    model = nn.Sequential(*[nn.Linear(i, o) for i, o in sizes])
    R.add_randlora(model, [str(j) for j in range(len(sizes))], r, 1.0)
    expected = sum(math.ceil(min(s) / r) * (r + min(s)) for s in sizes)
    per_layer = sum(u.lam.numel() + u.gam.numel() for u, _ in R.adapters(model).values())
    assert R.trainable_parameters(model) == per_layer == expected


@FAST
@given(sizes=st.lists(st.tuples(st.integers(8, 64), st.integers(8, 64)), min_size=1, max_size=3),
       lora_rank=st.integers(1, 8))
def test_rank_for_budget_is_the_closest_count(sizes, lora_rank):
    model = nn.Sequential(*[nn.Linear(i, o) for i, o in sizes])
    targets = [str(j) for j in range(len(sizes))]
    r = R.rank_for_budget(model, targets, lora_rank)
    budget = sum(lora_rank * (i + o) for i, o in sizes)
    count = lambda q: sum(math.ceil(min(s) / q) * (q + min(s)) for s in sizes)
    assert all(abs(count(r) - budget) <= abs(count(q) - budget) for q in range(1, min(min(s) for s in sizes) + 1))
    R.add_randlora(model, targets, r, 1.0)
    assert R.trainable_parameters(model) == count(r)


# --------------------------------------------------------------------------- gradients


def _function_inputs(i, o, r, T, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    k, D = min(i, o), max(i, o)
    n = math.ceil(k / r)
    A, B = (t.double() for t in R.make_bases(r, k, D, "uniform", seed))
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
    return (rnd(T, i), rnd(o, i), rnd(o), rnd(n, r), rnd(n, k)), (A, B[:n], 0.7, i > o)


@pytest.mark.parametrize("path", ["materialised", "factored"])
@pytest.mark.parametrize("i,o,r", [(5, 9, 2), (9, 5, 2), (6, 6, 4)])    # n > 1, r | k and not
def test_gradcheck_custom_function(path, i, o, r):
    tensors, frozen = _function_inputs(i, o, r, 4, seed=i * o)
    assert torch.autograd.gradcheck(lambda *t: R.randlora_linear(*t, *frozen, path=path), tensors)


def naive(x, w, b, lam, gam, A, B, s, transposed):
    U = s * sum(B[j] @ torch.diag(lam[j]) @ A @ torch.diag(gam[j]) for j in range(B.shape[0]))
    return F.linear(x, w + (U.T if transposed else U), b)


@FAST
@given(i=dims, o=dims, r=st.integers(1, 7), T=st.integers(1, 12), seed=st.integers(0, 999),
       path=st.sampled_from(["auto", "materialised", "factored"]))
def test_gradients_equal_naive_autograd(i, o, r, T, seed, path):
    r = min(r, i, o)
    tensors, frozen = _function_inputs(i, o, r, T, seed)
    y = R.randlora_linear(*tensors, *frozen, path=path)
    y_ref = naive(*tensors, *frozen)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, tensors, gy)
    grads_ref = torch.autograd.grad(y_ref, tensors, gy)
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_backward_returns_only_the_gradients_asked_for():
    (x, w, b, lam, gam), frozen = _function_inputs(6, 10, 3, 4, 0, requires_grad=False)
    lam.requires_grad_(True)
    for path in ("materialised", "factored"):
        R.randlora_linear(x, w, b, lam, gam, *frozen, path=path).sum().backward()
        assert x.grad is None and w.grad is None and gam.grad is None and lam.grad is not None
        lam.grad = None


def test_function_saves_only_x_for_backward():
    """Besides parameters and buffers (which exist anyway), backward keeps exactly x."""
    model = mlp(32, 64, 32, dtype=torch.float32)
    R.add_randlora(model, ["0", "2"], 8, 1.0)
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    x = torch.randn(50, 32)
    for path in ("materialised", "factored"):
        for u, _ in R.adapters(model).values():
            u.path = path
        saved = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in owned:
                saved.append(t)
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = model[0](x)
        assert [tuple(t.shape) for t in saved] == [(50, 32)] and saved[0].data_ptr() == x.data_ptr()
        del h


@pytest.mark.parametrize("transposed", [False, True])
def test_path_choice_flips_where_the_cost_model_says(transposed):
    D, k = 3072, 768
    costs = lambda T: R.path_costs(T, D, k, k, transposed)
    cheaper = [T for T in range(1, 4000) if costs(T)["materialised"] <= costs(T)["factored"]]
    flip = cheaper[0]
    assert R.choose_path(flip - 1, D, k, k, transposed) == "factored"
    assert R.choose_path(flip, D, k, k, transposed) == "materialised"
    assert 0.2 * k < flip <= 2 * k                              # "below roughly k" (2k when D = 4k)


# --------------------------------------------------------------------------- bases


@pytest.mark.parametrize("basis", ["binary", "sparse", "very_sparse"])
def test_ternary_bases_values_and_sparsity(basis):
    r, k_max, D_max = 16, 300, 900
    A, B = R.make_bases(r, k_max, D_max, basis, seed=3)
    s = R.ternary_scale(basis, D_max)
    for M in (A, B):
        v = torch.tensor(math.sqrt(s)).item()                               # sqrt(s) in float32
        assert set(torch.unique(M).tolist()) <= {-v, 0.0, v}
        N, p0 = M.numel(), 1 - 1 / s
        zeros = (M == 0).sum().item()
        assert abs(zeros - N * p0) <= 6 * math.sqrt(N * p0 * (1 - p0)) + 1   # binomial, 6 sigma
        assert abs(M.double().var().item() - 1) < 0.15                          # unit variance
        assert (M > 0).sum().item() == pytest.approx((M < 0).sum().item(), rel=0.2, abs=3 * math.sqrt(N))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), basis=st.sampled_from(["binary", "sparse"]))
def test_ternary_bases_keep_full_rank(seed, basis):
    """With k (1 - 1/s)^r << 1 (no all-zero column of A is likely), the update is full rank."""
    model = nn.Sequential(nn.Linear(40, 64).double(), nn.Linear(64, 40).double())
    R.add_randlora(model, ["0", "1"], 20, 1.0, basis=basis, seed=seed)
    randomise(model, seed)
    for u, _ in R.adapters(model).values():
        assert rank(u.delta_weight()) == 40


def test_very_sparse_bases_lose_the_columns_where_A_is_zero():
    """The caveat behind sec. 6.4: a zero column of the shared A is a zero column of U, so
    rank(DeltaW) <= non-zero columns of A; expected zero fraction (1 - 1/s)^r."""
    model = nn.Sequential(nn.Linear(256, 1024).double())
    R.add_randlora(model, "0", 4, 1.0, basis="very_sparse", seed=0)
    randomise(model)
    A, _ = model[0].bases()
    nonzero_cols = int((A != 0).any(0).sum())
    assert rank(model[0].delta_weight()) == nonzero_cols < 256
    expected_zero = 256 * (1 - 1 / math.sqrt(1024)) ** 4
    assert abs((256 - nonzero_cols) - expected_zero) < 6 * math.sqrt(expected_zero)


def test_bases_are_shared_views_even_after_to():
    model = nn.Sequential(*[nn.Linear(24, 48), nn.Linear(48, 24), nn.Linear(24, 24)])
    R.add_randlora(model, ["0", "1", "2"], 4, 1.0)
    for m in (model, model.to(torch.float64), copy.deepcopy(model)):
        ptrs = {t.untyped_storage().data_ptr() for u, _ in R.adapters(m).values() for t in u.bases()}
        assert len(ptrs) == 2                                            # one A_full, one B_full
        assert sum(1 for _ in m.buffers()) == 2 and next(m.buffers()).dtype == torch.float64
    assert "A" not in str(list(model.state_dict()))                      # never in checkpoints


def test_bases_do_not_depend_on_the_model_dtype():
    A32, B32 = R.make_bases(4, 24, 48, "uniform", 7)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        model = nn.Sequential(nn.Linear(24, 48).to(dtype))
        R.add_randlora(model, "0", 4, 1.0, seed=7)
        A, B = model[0].bases()
        assert torch.equal(A, A32.to(dtype)) and torch.equal(B, B32[: B.shape[0]].to(dtype))


def test_same_seed_gives_identical_bases_in_a_fresh_process():
    code = "import randlora, hashlib; A, B = randlora.make_bases(5, 33, 70, 'very_sparse', 11); " \
           "print(hashlib.sha256(A.numpy().tobytes() + B.numpy().tobytes()).hexdigest())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib
    A, B = R.make_bases(5, 33, 70, "very_sparse", 11)
    assert out == hashlib.sha256(A.numpy().tobytes() + B.numpy().tobytes()).hexdigest()
    A2, _ = R.make_bases(5, 33, 70, "very_sparse", 12)
    assert not torch.equal(A, A2)


# --------------------------------------------------------------------------- theorem, eq. 8


@FAST
@given(i=st.integers(6, 20), o=st.integers(6, 20), r=st.integers(1, 4), seed=st.integers(0, 999))
def test_eckart_young_floor_binds_lora_but_not_randlora(i, o, r, seed):
    """Target: a full-rank update that RandLoRA represents exactly. Every rank-r matrix (LoRA's
    best included) stays sqrt(sum_{j>r} sigma_j^2) away from it; RandLoRA reaches 0."""
    model = nn.Sequential(nn.Linear(i, o).double())
    R.add_randlora(model, "0", r, 1.0, seed=seed)
    randomise(model, seed)
    target = model[0].delta_weight().detach()
    U, S, Vh = torch.linalg.svd(target)
    floor = S[r:].square().sum().sqrt()
    assert floor > 1e-6 * S[0]
    best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    torch.testing.assert_close(torch.linalg.norm(target - best), floor)
    g = torch.Generator().manual_seed(seed)
    noise = lambda *shape: 0.1 * torch.randn(*shape, generator=g, dtype=torch.float64)
    for _ in range(5):                                                     # other rank-r matrices
        other = (U[:, :r] * S[:r] + noise(o, r)) @ (Vh[:r] + noise(r, i))
        assert torch.linalg.norm(target - other) >= floor - 1e-9
    assert torch.linalg.norm(target - oracle_delta(model[0])) < 1e-9 * floor


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_in_a_fresh_model(tmp_path):
    base = mlp(16, 40, 16, dtype=torch.float32)
    model = copy.deepcopy(base)
    R.add_randlora(model, ["0", "2"], 4, 2.0, basis="sparse", seed=5)
    randomise(model)
    path = tmp_path / "adapter.pt"
    R.save_adapter(model, path)
    state = torch.load(path, weights_only=True)
    n_tensor = sum(t.numel() for t in state["tensors"].values())
    assert n_tensor == R.trainable_parameters(model)                      # no bases inside
    assert path.stat().st_size < 4 * n_tensor + 4096
    fresh = copy.deepcopy(base)
    R.add_randlora(fresh, ["0", "2"], 4, 2.0, basis="sparse", seed=5)
    R.load_adapter(fresh, path)
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), model(x))


def test_lora_checkpoint_round_trip():
    model, fresh = mlp(8, 12, 8, torch.float32), mlp(8, 12, 8, torch.float32)
    for m in (model, fresh):
        R.add_lora(m, ["0", "2"], 2, 4.0)
    randomise(model)
    R.load_adapter_state_dict(fresh, R.adapter_state_dict(model))
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), model(x))


# --------------------------------------------------------------------------- bad input


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(target_modules="nope", r=2, alpha=1.0), ValueError, "candidates: 0, 2"),
    (dict(target_modules=["0"], r=0, alpha=1.0), ValueError, "r must be >= 1"),
    (dict(target_modules=["0"], r=9, alpha=1.0), ValueError, "choose r <= 8"),
    (dict(target_modules=["0"], r=2.0, alpha=1.0), TypeError, "r must be an int"),
    (dict(target_modules=["0"], r=2, alpha=float("nan")), ValueError, "finite"),
    (dict(target_modules=["0"], r=2, alpha=float("inf")), ValueError, "finite"),
    (dict(target_modules=["0"], r=2, alpha=1.0, basis="gaussian"), ValueError, "unknown basis"),
    (dict(target_modules=["0"], r=2, alpha=1.0, dropout=1.0), ValueError, "dropout"),
    (dict(target_modules=[3], r=2, alpha=1.0), TypeError, "target_modules"),
    (dict(target_modules=[], r=2, alpha=1.0), ValueError, "nothing to adapt"),
    (dict(target_modules=["0"], r=2, alpha=1.0, target_parameters="0.weight"), ValueError, "belongs to"),
])
def test_bad_arguments_raise_and_change_nothing(kwargs, error, words):
    model = mlp(8, 12, 8)
    before = snapshot(model)
    with pytest.raises(error, match=words):
        R.add_randlora(model, **kwargs)
    assert_unchanged(model, before)
    assert not R.adapters(model) and all(p.requires_grad for p in model.parameters())


def test_patching_twice_is_refused():
    model = mlp(8, 12, 8)
    R.add_randlora(model, ["0"], 2, 1.0)
    before = snapshot(model)
    for again in (lambda: R.add_randlora(model, ["2"], 2, 1.0), lambda: R.add_lora(model, ["2"], 2, 1.0)):
        with pytest.raises(ValueError, match="already patched"):
            again()
    assert_unchanged(model, before)


@pytest.mark.parametrize("change,words", [
    (dict(seed=1), "seed"), (dict(r=3), "r=3"), (dict(basis="normal"), "basis"),
])
def test_loading_a_mismatched_checkpoint_is_refused(change, words):
    cfg = dict(target_modules=["0", "2"], r=2, alpha=1.0, basis="uniform", seed=0)
    src, dst = mlp(8, 12, 8), mlp(8, 12, 8)
    R.add_randlora(src, **cfg)
    R.add_randlora(dst, **{**cfg, **change})
    before = snapshot(dst)
    with pytest.raises(ValueError, match=words):
        R.load_adapter_state_dict(dst, R.adapter_state_dict(src))
    assert_unchanged(dst, before)


def test_loading_wrong_shapes_or_names_is_refused():
    src, dst = mlp(8, 12, 8), mlp(8, 12, 8)
    for m in (src, dst):
        R.add_randlora(m, ["0", "2"], 2, 1.0)
    state = R.adapter_state_dict(src)
    before = snapshot(dst)
    bad_shape = copy.deepcopy(state)
    bad_shape["tensors"]["0.lam"] = torch.zeros(3, 3)
    missing = copy.deepcopy(state)
    del missing["tensors"]["2.gam"]
    for bad, words in ((bad_shape, "shape"), (missing, "missing"), ({"x": 1}, "not an adapter checkpoint")):
        with pytest.raises(ValueError, match=words):
            R.load_adapter_state_dict(dst, bad)
    assert_unchanged(dst, before)


def test_merge_refuses_to_write_non_finite_weights():
    model = mlp(8, 12, 8, dtype=torch.float32)
    R.add_randlora(model, ["0", "2"], 2, 1.0)
    with torch.no_grad():
        model[2].lam.fill_(1e30)
        model[2].gam.fill_(1e30)
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite"):
        R.merge(model)
    assert_unchanged(model, before)
    assert not any(u.merged for u, _ in R.adapters(model).values())

# --------------------------------------------------------------------------- demo_toy.py: the central claim


@functools.lru_cache(maxsize=None)
def _quick():
    """One run of the demo's real code path in --quick mode, shared by the tests below."""
    return demo_toy.run(quick=True, seed=0)


def _by_budget(results, method):
    return {x["budget"]: x for x in results["runs"] if x["method"] == method}


def test_randlora_goes_below_lora_floor_at_equal_parameters():
    res = _quick()
    lora, rand = _by_budget(res, "lora"), _by_budget(res, "randlora")
    assert set(lora) == set(rand) and len(lora) >= 3
    base = demo_toy.make_problem(0, 0.0)[0]
    for b in lora:
        lo, ra = lora[b], rand[b]
        assert ra["r"] == R.rank_for_budget(base, demo_toy.NAMES, b)
        assert ra["params"] <= lo["params"]                        # RandLoRA never gets more to spend
        assert abs(ra["params"] - lo["params"]) <= 0.15 * lo["params"]
        assert lo["error"] >= lo["floor"] - 1e-6                   # Eckart-Young holds for LoRA ...
        assert lo["error"] <= lo["floor"] + 1e-3                   # ... and LoRA trains onto its floor
        assert ra["error"] < lo["floor"] - 0.02                    # RandLoRA goes clearly below it
        assert ra["heldout"] < lo["floor"]


def test_randlora_update_is_full_rank_and_lora_update_is_rank_r():
    res = _quick()
    for x in _by_budget(res, "randlora").values():
        assert x["ranks"] == x["ks"]
    for x in _by_budget(res, "lora").values():
        assert max(x["ranks"]) <= x["r"]
    full = next(x for x in res["runs"] if x["method"] == "full")
    assert full["error"] < 1e-4


def test_train_loss_is_weight_error_with_whitened_inputs():
    """With X^T X = N I the loss equals sum_l ||DeltaW_l - DeltaW*_l||_F^2: the floor is exact."""
    for x in _quick()["runs"]:
        assert x["train"] == pytest.approx(x["error"], abs=1e-4)
        assert x["heldout"] == pytest.approx(x["error"], abs=0.02)  # Gaussian x: equal in expectation


def test_eckart_young_floor_matches_truncated_svd():
    """The floor the demo reports equals the error of an explicit best rank-r approximation."""
    _, changes, _, _ = demo_toy.make_problem(0, 0.0)
    for x in _by_budget(_quick(), "lora").values():
        err = 0.0
        for c in changes:
            U, S, Vh = torch.linalg.svd(c.double())
            best = U[:, : x["r"]] @ torch.diag(S[: x["r"]]) @ Vh[: x["r"]]
            err += ((c.double() - best) ** 2).sum().item()
        assert x["floor"] == pytest.approx(err, rel=1e-6)


def test_verdict_is_derived_from_the_numbers():
    res = _quick()
    lora, rand = _by_budget(res, "lora"), _by_budget(res, "randlora")
    top = max(lora)
    text = res["verdict"]
    assert f"{len(lora)} of {len(lora)}" in text
    assert f"{rand[top]['error']:.4f}" in text and f"{lora[top]['floor']:.4f}" in text
    worse = copy.deepcopy(res)                                     # make RandLoRA lose at one budget
    for x in worse["runs"]:
        if x["method"] == "randlora" and x["budget"] == min(lora):
            x["error"] = 2.0
    changed = demo_toy.verdict(worse)
    assert changed != text and f"{len(lora) - 1} of {len(lora)}" in changed


def test_cli_prints_table_verdict_and_is_reproducible(capsys):
    assert demo_toy.main(["--quick", "--steps", "20", "--seed", "3"]) == 0
    first = capsys.readouterr()
    assert "Verdict:" in first.out and "randlora" in first.out and "7/7]" in first.err
    demo_toy.main(["--quick", "--steps", "20", "--seed", "3"])
    assert capsys.readouterr().out == first.out


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # `import matplotlib` now fails
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "toy.png"
    assert demo_toy.main(["--quick", "--steps", "5", "--plot", str(out)]) == 0
    captured = capsys.readouterr()
    assert "pip install matplotlib" in captured.err and "Verdict:" in captured.out
    assert not out.exists()


def test_plot_writes_a_figure(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "toy.png"
    assert demo_toy.plot(_quick(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "--seed"), (["--seed", "x"], "--seed"), (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"), (["--decay", "-1"], "--decay"), (["--steps", "0"], "--steps"),
    (["--plot", "/no/such/folder/x.png"], "does not exist"), (["--plot", "x.txt"], ".png"),
    (["--quick", "--lr", "1e30", "--steps", "5"], "diverged"),
])
def test_cli_bad_input_is_a_usage_error_not_a_traceback(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        demo_toy.main(argv)
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err
