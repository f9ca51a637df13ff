"""RandLoRA: full-rank parameter-efficient fine-tuning, in one file.

A frozen weight W (out, in) is adapted by an update built from frozen random low-rank bases
that every adapted layer of the model shares; only diagonal scalings train:

    U      = s * sum_{b=1..n} B_b diag(lam_b) A diag(gam_b)          (paper eq. 4)   (D, k)
    DeltaW = U if in <= out, else U^T      (gam always sits on the smaller dimension)  (out, in)
    y      = x W^T + bias + x DeltaW^T

Symbols and shapes (the letters of every shape comment below):
    T          tokens: every leading dimension of x flattened
    k, D       min(in, out), max(in, out)
    r          rank of each random basis;  n = ceil(k / r) bases;  m = n * r >= k
    A          (r, k)       = A_full[:, :k]        one A shared by all n bases of a layer
    B          (n, D, r)    = B_full[:n, :D, :]    B_b = B[b];  Bcat = [B_1 .. B_n]  (D, m)
    lam, gam   (n, r), (n, k)   trainable, init 0 and gam0: the diagonals of Lambda_b, Gamma_b
    s, gam0    by the convention `scaling` names (lam = 0 makes the patched model the base model):
                 "paper" (default)  s = alpha / (r sqrt(n)),  gam0 = 1/D   [1, app. C.4, and the authors' code]
                 "peft"             s = alpha / r,            gam0 = 1/k   [4]; its default alpha = 20r: s = 20
A_full (r, k_max) and B_full (n_max, D_max, r) are drawn once per model; layers read views.

"paper" divides alpha / r by sqrt(n), as a sum of n independent random rank-r terms grows like
sqrt(n); the paper's alpha = 2r gives s = 2 / sqrt(n). The first author has since called that an
older strategy, abandoned for scaling the bases, and the Hugging Face code the most up to date,
with alpha in s = alpha / r "somewhere between 2r and 20r" [5]. Adam's first step moves DeltaW
by s gam0 lr (times a sum of bases): sqrt(n) D / k times more under "peft" at equal alpha and lr.

Why the update is full rank: U = s Bcat LQ, LQ = diag(lam) [A diag(gam_1); ..; A diag(gam_n)]
(m, k). With m >= k, random bases and generic lam, gam (distinct across b) both factors have
rank k, so U has, though each term has rank r; LoRA's B A has rank r, so by Eckart-Young its
error on a target update is at least sqrt(sum_{i>r} sigma_i^2) (eq. 8). At init the gam_b are
equal (U has rank r until training separates them), and a zero column of a sparse A is one of U.

Cost. The autograd function saves only x. A layer either materialises W + DeltaW (formed again
in backward for x's gradient) or projects the tokens through the factors. lam's and gam's
gradients come from H = Bcat^T G (m, k), G = gy^T x the weight gradient (TDk + Dkm), or while
T < D from the tokens projected through Bcat (TDm + Tkm). Multiply-adds (tr = 1 if in > out):
    inference   materialised  TDk + Dkm          factored  TDk + TDm + Tkm
    training    materialised  2TDk + 2Dkm + H    factored  2TDk + (2 + tr) TDm + 3Tkm
so a layer materialises from T >= Dkm / (Dm + km) (inference) or 2Dkm / ((1 + tr) Dm + 2km)
(training, always below D): thresholds of its shape, computed once when it is built.

References
    [1] Albert et al., RandLoRA: Full-rank parameter-efficient fine-tuning of large models,
        ICLR 2025, arXiv 2502.00987 (sec. 4: eqs. 4 and 8; sec. 6.4; app. C.4-C.6).
    [2] Li, Hastie, Church, Very sparse random projections, KDD 2006 (ternary bases).
    [3] Hu et al., LoRA: Low-rank adaptation of large language models, ICLR 2022.
    [4] Hugging Face PEFT 0.21, src/peft/tuners/randlora (layer.py: scaling = randlora_alpha / r, gamma from
        1 / max(gamma.shape); config.py: randlora_alpha = 640 for r = 32).
    [5] P. Albert, "Questions about scaling", github.com/PaulAlbert31/RandLoRA/issues/1, July 2025.
"""
import contextlib
import math
import os
import zipfile
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

FORMAT_VERSION = 2          # 2: s = alpha / (r sqrt(n)), gam from 1/D; 1 had s = alpha / r, 1/k
BASES = ("uniform", "normal", "binary", "sparse", "very_sparse")
PATHS = ("auto", "materialised", "factored")
SCALINGS = ("paper", "peft")

# ---- Configuration ---------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterConfig:
    method: str                          # "randlora" or "lora"
    r: int                               # rank of each random basis (RandLoRA) / of the update (LoRA)
    alpha: float                         # RandLoRA: s = alpha / (r sqrt(n)) or alpha / r (by scaling); LoRA: alpha / r
    basis: str = "uniform"               # distribution of the frozen bases (RandLoRA only)
    seed: int = 0                        # seeds the bases (RandLoRA) or LoRA's A
    dropout: float = 0.0                 # dropout on the adapter branch's input while training
    target_modules: tuple = ()           # qualified names (or dotted suffixes) of nn.Linear / Conv1D
    target_parameters: tuple = ()        # qualified names (or suffixes) of raw 2-D weight Parameters
    trainable: tuple = ()                # modules left trainable and saved with the adapter (a head)
    scaling: str = "paper"               # RandLoRA's s and gam0: "paper" or "peft" (the docstring); not LoRA's

# ---- Frozen random bases ---------------------------------------------------------------

def _sample(shape, basis: str, D_max: int, gen: torch.Generator) -> torch.Tensor:
    if basis == "uniform":                                   # U(-sqrt3, sqrt3): unit variance
        return (torch.rand(shape, generator=gen) * 2 - 1) * math.sqrt(3)
    if basis == "normal":
        return torch.randn(shape, generator=gen)
    s = {"binary": 1.0, "sparse": 3.0, "very_sparse": math.sqrt(D_max)}[basis]   # Li et al.'s s [2]
    u = torch.rand(shape, generator=gen)                     # sqrt(s) {-1, 0, 1} w.p. 1/2s, 1-1/s, 1/2s
    return math.sqrt(s) * ((u < 0.5 / s).float() - (u >= 1 - 0.5 / s).float())

def make_bases(r: int, k_max: int, D_max: int, basis: str = "uniform", seed: int = 0):
    """A_full (r, k_max) and B_full (n_max, D_max, r), float32, the same bits for a seed on any hardware (drawn
    on the CPU from their own generator, A first). B_full is D-major: each layer's Bcat (D, m) is a view."""
    gen = torch.Generator("cpu").manual_seed(seed)
    A = _sample((r, k_max), basis, D_max, gen)                          # (r, k_max)
    B = _sample((math.ceil(k_max / r), D_max, r), basis, D_max, gen)    # (n_max, D_max, r)
    return A, B.transpose(0, 1).contiguous().transpose(0, 1)           # strides (r, n_max r, 1)

class SharedBases(nn.Module):
    """A_full and B_full once per model, as non-persistent buffers, of which every layer keeps views."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, config: AdapterConfig):
        super().__init__()
        self.config, self.layers = config, []                           # layers: plain references
        self.register_buffer("A", A, persistent=False)                  # (r, k_max)
        self.register_buffer("B", B, persistent=False)                  # (n_max, D_max, r)

    def _apply(self, fn, *args, **kwargs):                              # moved: every layer views it again
        super()._apply(fn, *args, **kwargs)
        for layer in self.layers:
            layer.views(remake=True)
        return self

# ---- The memory-saving autograd function -----------------------------------------------
# DeltaW is formed by _delta only. With H = Bcat^T G_U (m, k), G_U the (D, k) dL/dU, U = s Bcat LQ:
#   dL/dlam[b, i] = s sum_c H[b r + i, c] A[i, c] gam[b, c],   dL/dgam[b, c] = s sum_i H[b r + i, c] A[i, c] lam[b, i]

def _lq(lam, gam, A):
    """LQ = diag(lam) [A diag(gam_1); ..; A diag(gam_n)] (m, k): U = s Bcat LQ."""
    return (lam.unsqueeze(2) * gam.unsqueeze(1) * A).view(-1, A.shape[1])   # (n, r, k) -> (m, k)

def _addmm(base, L, R, s):                                              # base + s L R (s L R if no base)
    return torch.mm(L, R).mul_(s) if base is None else torch.addmm(base, L, R, alpha=s)

def _delta(Bcat, LQ, s, transposed, base=None):
    """(base +) DeltaW = s Bcat LQ, (out, in): eq. 4's one implementation, which all others call."""
    return _addmm(base, LQ.T, Bcat.T, s) if transposed else _addmm(base, Bcat, LQ, s)

def _to(t, dt):                                 # t in dtype dt, skipping a no-op .to() (it costs ~1 us)
    return t if t is None or t.dtype is dt else t.to(dt)

def _wide(dt):                                  # float32, or dt where wider: masters and merges
    return torch.promote_types(dt, torch.float32)

def _flat(t, dt):                               # t as (T, features) in dtype dt, with no op where it is
    return _to(t if t.dim() == 2 else t.reshape(-1, t.shape[-1]), dt)

class RandLoRAFunction(torch.autograd.Function):
    """y = x W^T + bias + x DeltaW^T (`weight=None`: the update alone; the path is the caller's). Saves x, and
    references to what exists anyway; DeltaW, W + DeltaW, G and the (T, m) projections are formed in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lam, gam, A, Bcat, scale, transposed, materialise):
        dev = x.device.type                                             # autocast decides, else x
        dt = torch.get_autocast_dtype(dev) if not x.is_meta and torch.is_autocast_enabled(dev) else x.dtype
        ctx.save_for_backward(x, weight, bias, lam, gam, A, Bcat)      # x, and what exists anyway
        ctx.scale, ctx.transposed, ctx.materialise, ctx.dtype = scale, transposed, materialise, dt
        x2, Bc, LQ = _flat(x, dt), _to(Bcat, dt), _to(_lq(lam, gam, A), dt)   # (T, in), (D, m), (m, k)
        w, b = _to(weight, dt), _to(bias, dt)                           # (out, in), (out,)
        if materialise:
            y = F.linear(x2, _delta(Bc, LQ, scale, transposed, w), b)   # (T, out)
        else:                                                           # x DeltaW^T = (x L) R
            L, R = (Bc, LQ) if transposed else (LQ.T, Bc.T)             # (in, m), (m, out)
            y = _addmm(None if w is None else F.linear(x2, w, b), x2 @ L, R, scale)   # (T, out)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, lam, gam, A, Bcat = ctx.saved_tensors
        need_x, need_w, need_b, need_lam, need_gam = ctx.needs_input_grad[:5]
        s, tr, dt = ctx.scale, ctx.transposed, ctx.dtype
        x2, gy2, Bc, w = _flat(x, dt), _flat(gy, dt), _to(Bcat, dt), _to(weight, dt)   # (T, in), (T, out), (D, m)
        LQ = _to(_lq(lam, gam, A), dt) if need_x else None              # (m, k)
        gx = glam = ggam = None
        by_weight = ctx.materialise and x2.shape[0] >= Bc.shape[0]     # H from G if T >= D, else tokens
        G = gy2.T @ x2 if need_w or (by_weight and (need_lam or need_gam)) else None   # (out, in)
        Z = None if by_weight else (x2 if tr else gy2) @ Bc            # (T, m)
        if need_lam or need_gam:
            H = Bc.T @ (G.T if tr else G) if by_weight else Z.T @ (gy2 if tr else x2)   # (m, k) = Bcat^T G_U
            HA = _to(H.view(*lam.shape, -1), lam.dtype).mul_(s).mul_(A)  # (n, r, k): dL/dLQ * A
            glam, ggam = (HA * gam.unsqueeze(1)).sum(2), (HA * lam.unsqueeze(2)).sum(1)   # (n, r), (n, k)
        if need_x and ctx.materialise:                                  # through W + DeltaW, formed again
            gx = gy2 @ _delta(Bc, LQ, s, tr, w)                         # (T, in)
        elif need_x:                                                    # through the factors
            gyW = None if w is None else gy2 @ w                        # (T, in)
            gx = _addmm(gyW, gy2 @ LQ.T, Bc.T, s) if tr else _addmm(gyW, Z, LQ, s)
        gx = _to(gx if x.dim() == 2 else gx.reshape(x.shape), x.dtype) if need_x else None
        gw = _to(G, weight.dtype) if need_w else None
        gb = _to(gy2.sum(0), bias.dtype) if need_b else None            # (out,)
        return gx, gw, gb, glam, ggam, None, None, None, None, None

# ---- Layers ----------------------------------------------------------------------------
# RandLoRA, LoRA: the update of one weight, a parametrization W -> W + DeltaW; *Linear: an nn.Linear with it, x -> y.

def _trainables(u) -> dict:
    return {"lam": u.lam, "gam": u.gam} if isinstance(u, RandLoRA) else {"lora_A": u.lora_A, "lora_B": u.lora_B}

class _Update(nn.Module):
    """What RandLoRA and LoRA share. state_dict records a merge (`merged_flag`, `<name>_merged`): unmerge takes
    out what merge put in, even if an optimizer moved the trainables since. They stay float32 through .half()."""

    def __init__(self, fan_in_fan_out: bool, **trainables):
        super().__init__()
        self.fan_in_fan_out, self.merged, self.disabled = fan_in_fan_out, False, False
        self.register_buffer("merged_flag", torch.tensor(False))
        for name, t in trainables.items():                              # and what the last merge used
            setattr(self, name, nn.Parameter(t))
            self.register_buffer(name + "_merged", torch.zeros_like(t))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.merged = bool(self.merged_flag)

    def _apply(self, fn, *args, **kwargs):
        keep = {k: getattr(self, k).data for n in _trainables(self) for k in (n, n + "_merged")}
        super()._apply(fn, *args, **kwargs)
        for k in [k for k in keep if getattr(self, k).element_size() < 4]:   # moved, but kept float32 or wider
            getattr(self, k).data = keep[k].to(getattr(self, k).device)
        return self

    def _adopt(self, base: nn.Module, dropout: float):                 # *Linear: share W and bias
        self.weight, self.bias, self.dropout = base.weight, base.bias, nn.Dropout(dropout)
        object.__setattr__(self, "base_layer", base)                    # not a child: no copies

    def synced_base(self) -> nn.Module:                                 # the module it replaced
        self.base_layer.weight, self.base_layer.bias = self.weight, self.bias
        return self.base_layer

class RandLoRA(_Update):
    """The update of one frozen weight (lam, gam, views of the bases); alone, a parametrization W -> W + DeltaW."""

    def __init__(self, weight, bases: SharedBases, r, alpha, fan_in_fan_out=False, scaling="paper"):
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        out_f, in_f = weight.shape[::-1] if fan_in_fan_out else weight.shape
        k, D, tr = min(in_f, out_f), max(in_f, out_f), in_f > out_f
        n, m = math.ceil(k / r), math.ceil(k / r) * r
        s, gam0 = (alpha / (r * math.sqrt(n)), 1 / D) if scaling == "paper" else (alpha / r, 1 / k)
        kw = dict(device=weight.device, dtype=_wide(weight.dtype))     # float32 masters for bf16/fp16
        super().__init__(fan_in_fan_out, lam=torch.zeros(n, r, **kw),  # (n, r)
                         gam=torch.full((n, k), gam0, **kw))           # (n, k)
        self.k, self.D, self.r, self.n, self.transposed, self.scale = k, D, r, n, tr, s
        self.threshold_inference = math.ceil(D * k * m / (D * m + k * m))          # see the docstring
        self.threshold_training = math.ceil(2 * D * k * m / ((1 + tr) * D * m + 2 * k * m))
        object.__setattr__(self, "_shared", bases)                      # a reference, not a child
        bases.layers.append(self)
        self.views(remake=True)

    def views(self, remake=False):
        """A (r, k), Bcat (D, m): views of the shared bases, made again once those move (.to(), FSDP's .data)."""
        B = self._shared.B                                              # (n_max, D_max, r)
        if remake or self.Bcat.device != B.device or self.Bcat.dtype != B.dtype:
            self.A = self._shared.A[:, : self.k]                                # (r, k)
            self.Bcat = B[: self.n, : self.D].transpose(0, 1).reshape(self.D, -1)  # (D, m), a view
        return self.A, self.Bcat

    def delta_weight(self, at_merge=False) -> torch.Tensor:
        """DeltaW in the base weight's layout ((in, out) for a Conv1D); `at_merge`: as last merged."""
        lam, gam = (self.lam_merged, self.gam_merged) if at_merge else (self.lam, self.gam)
        A, Bcat = self.views()
        dt = torch.promote_types(lam.dtype, A.dtype)
        dw = _delta(Bcat.to(dt), _lq(lam, gam, A).to(dt), self.scale, self.transposed)
        return dw.T if self.fan_in_fan_out else dw                     # (out, in) or (in, out)

    def forward(self, W):                                               # as a parametrization
        if self.merged or self.disabled:
            return W
        A, Bcat = self.views()                                          # autograd keeps these views, lam and gam
        dt = torch.promote_types(W.dtype, A.dtype)                      # W's, unless the bases are wider
        with contextlib.nullcontext() if W.is_meta else torch.autocast(W.device.type, enabled=False):   # W's dtype
            return _to(_delta(_to(Bcat, dt), _to(_lq(self.lam, self.gam, A), dt), self.scale, self.transposed,
                              _to(W, dt)), W.dtype)

class LoRA(_Update):
    """The baseline DeltaW = (alpha / r) lora_B lora_A; lora_B (out, r) starts at 0, lora_A (r, in) U(+-1/sqrt(in))."""

    def __init__(self, weight, r, alpha, gen: torch.Generator, fan_in_fan_out=False):
        out_f, in_f = weight.shape[::-1] if fan_in_fan_out else weight.shape
        kw = dict(device=weight.device, dtype=_wide(weight.dtype))
        a = (torch.rand(r, in_f, generator=gen) * 2 - 1) / math.sqrt(in_f)
        super().__init__(fan_in_fan_out, lora_A=a.to(**kw), lora_B=torch.zeros(out_f, r, **kw))   # (r, in), (out, r)
        self.r, self.scale = r, alpha / r

    def delta_weight(self, at_merge=False) -> torch.Tensor:
        B, A = (self.lora_B_merged, self.lora_A_merged) if at_merge else (self.lora_B, self.lora_A)
        dw = self.scale * (B @ A)                                      # (out, in)
        return dw.T if self.fan_in_fan_out else dw

    def forward(self, W):                                               # as a parametrization
        return W if self.merged or self.disabled else W + self.delta_weight().to(W.dtype)

class RandLoRALinear(RandLoRA):
    """An nn.Linear (or Conv1D) with a RandLoRA update. `path`: "auto" (the docstring's rule), or one forced."""

    def __init__(self, base: nn.Module, bases: SharedBases, r, alpha, dropout=0.0, scaling="paper"):
        super().__init__(base.weight, bases, r, alpha, type(base).__name__ == "Conv1D", scaling)
        self._adopt(base, dropout)
        self.path = "auto"

    def chosen_path(self, T: int, grad: bool = True) -> str:
        if self.path not in PATHS:
            raise ValueError(f"layer.path must be one of {PATHS}, got {self.path!r}")
        if self.path != "auto":
            return self.path
        threshold = self.threshold_training if grad else self.threshold_inference
        return "materialised" if T >= threshold else "factored"

    def forward(self, x):
        W = self.weight.T if self.fan_in_fan_out else self.weight      # (out, in)
        if self.merged or self.disabled:                                # disabled: the module it replaced
            return self.synced_base()(x) if self.disabled else F.linear(x, W, self.bias)
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point input, got {x.dtype}")
        mat = self.chosen_path(x.numel() // x.shape[-1], torch.is_grad_enabled()) == "materialised"
        args = (self.lam, self.gam, *self.views(), self.scale, self.transposed, mat)
        if self.training and self.dropout.p > 0:                       # the update sees other x
            return F.linear(x, W, self.bias) + RandLoRAFunction.apply(self.dropout(x), None, None, *args)
        return RandLoRAFunction.apply(x, W, self.bias, *args)

class LoRALinear(LoRA):
    def __init__(self, base: nn.Module, r, alpha, gen, dropout=0.0):
        super().__init__(base.weight, r, alpha, gen, fan_in_fan_out=type(base).__name__ == "Conv1D")
        self._adopt(base, dropout)

    def forward(self, x):
        if self.disabled:
            return self.synced_base()(x)                                # the module it replaced
        y = F.linear(x, self.weight.T if self.fan_in_fan_out else self.weight, self.bias)   # (..., out)
        if self.merged:
            return y
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))        # (..., r)
        y2 = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, self.r),   # y + s h B^T, fused
                         self.lora_B.to(x.dtype).T, alpha=self.scale)  # (T, out)
        return y2.reshape(y.shape)

# ---- Patching --------------------------------------------------------------------------

def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)

def _as_names(value, what: str) -> tuple:
    value = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"{what} must be a string or a list of non-empty strings, got {value!r}")
    return value

def _check_hparams(r, alpha, dropout, seed, basis="uniform", scaling="paper"):
    real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if type(r) is not int or type(seed) is not int:
        raise TypeError(f"r and seed must be ints, got r={r!r}, seed={seed!r}")
    for ok, message in ((r >= 1, f"r must be >= 1, got {r}"),
                        (-2**63 <= seed < 2**64, "seed must lie in [-2**63, 2**64)"),
                        (real(alpha) and alpha != 0, f"alpha must be a finite non-zero number, got {alpha!r}"),
                        (real(dropout) and 0 <= dropout < 1, f"dropout must be a number in [0, 1), got {dropout!r}"),
                        (basis in BASES, f"unknown basis {basis!r}; choose one of {BASES}"),
                        (scaling in SCALINGS, f"unknown scaling {scaling!r}; choose 'paper' (s = alpha / (r sqrt(n)), "
                                              "gam from 1/D) or 'peft' (s = alpha / r, gam from 1/k, PEFT's)")):
        if not ok:
            raise ValueError(message)

def _check_patchable(name: str, m: nn.Module, parents: list):
    """Refuse a layer that a patched layer in its place would not compute like."""
    fused = [type(p).__name__ for p in parents if isinstance(p, (nn.MultiheadAttention, nn.TransformerEncoderLayer))]
    for bad, why in ((fused, f"its parent {' and '.join(fused)} reads its weight directly (a fused path)"),
                     (not isinstance(m.weight, nn.Parameter),
                      "its weight is computed (weight norm or another parametrization or hook); remove that first"),
                     (isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward,
                      f"{type(m).__name__} has its own forward, which the patched layer would replace"),
                     (not isinstance(m, nn.Linear) and getattr(m, "nf", None) != m.weight.shape[-1],
                      "it is named Conv1D but is not Hugging Face's (weight (in, out), nf = out)")):
        if bad:
            raise ValueError(f"cannot patch {name!r}: {why}; use target_parameters=[{name + '.weight'!r}] instead")

def _find_targets(model, mods: tuple, params: tuple) -> list:
    """[(name, kind, module, weight)]: modules, then raw parameters, in model order (an aliased module once)."""
    if adapters(model):                                                 # (and model is a Module)
        raise ValueError("this model is already patched; patch a fresh copy of the base model instead")
    if not mods and not params:
        raise ValueError("nothing to adapt: pass target_modules (e.g. ['attn.qkv']) or target_parameters")
    every = list(model.named_modules(remove_duplicate=False))
    linear = {n: m for n, m in every if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    raw = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    for pats, pool, kind in ((mods, linear, "module"), (params, raw, "parameter")):
        for pat in [p for p in pats if not any(_matches(n, p) for n in pool)]:
            hint = " (it is a raw parameter: pass target_parameters)" if any(_matches(n, pat) for n in raw) else ""
            names = ", ".join(list(pool)[:30]) or "none"
            raise ValueError(f"target {pat!r} matches no {kind}{hint}; candidates: {names}")
    targets = []
    for name, m in linear.items():
        aliases = [n for n, x in every if x is m]
        if name == aliases[0] and any(_matches(a, p) for a in aliases for p in mods):
            _check_patchable(name, m, [model.get_submodule(a.rpartition(".")[0]) for a in aliases])
            targets.append((name, "module", m, m.weight))
    for name, p in [(n, p) for n, p in raw.items() if any(_matches(n, pat) for pat in params)]:
        owner = model.get_submodule(name.rpartition(".")[0])
        if any(t[2] is owner for t in targets):
            raise ValueError(f"{name!r} belongs to an adapted layer; target the layer or its weight, not both")
        targets.append((name, "parameter", owner, p))
    return targets

def _extra_trainables(model, patterns, targets=()) -> dict:
    """{qualified name: Parameter} of the modules named in `trainable`; validates."""
    hits = [n for n, _ in model.named_modules() if n and any(_matches(n, p) for p in patterns)]
    for pat in [p for p in patterns if not any(_matches(n, p) for n in hits)]:
        raise ValueError(f"trainable {pat!r} matches no module of the model")
    for n in [n for n in hits if any(t[0] == n or t[0].startswith(n + ".") for t in targets)]:
        raise ValueError(f"trainable {n!r} holds an adapted layer; name a module beside the targets (e.g. a head)")
    return {k: p for n in hits for k, p in model.get_submodule(n).named_parameters(prefix=n)}

def _replace(model, old: nn.Module, new: nn.Module):
    """Put `new` under every name that `old` has in the model."""
    for name in [n for n, x in model.named_modules(remove_duplicate=False) if x is old]:
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, new)

def _patch(model, c: AdapterConfig) -> list:
    """Validate everything, then freeze the model and install an adapter on every target."""
    c = replace(c, **{f: _as_names(getattr(c, f), f) for f in ("target_modules", "target_parameters", "trainable")})
    rand = c.method == "randlora"
    _check_hparams(c.r, c.alpha, c.dropout, c.seed, c.basis if rand else "uniform", c.scaling)
    targets = _find_targets(model, c.target_modules, c.target_parameters)
    extra = _extra_trainables(model, c.trainable, targets)
    for name, _, _, w in targets:
        if w.is_meta:
            raise ValueError(f"{name!r} is on the meta device; load the real weights before adapting them")
        if not w.is_floating_point():
            raise TypeError(f"{name!r} is {w.dtype}; adapt floating-point weights (dequantise them first)")
        if c.r > min(w.shape):
            raise ValueError(f"r={c.r} exceeds min(in, out)={min(w.shape)} of {name!r}; choose r <= {min(w.shape)}")
    if rand:
        A, B = make_bases(c.r, max(min(t[3].shape) for t in targets), max(max(t[3].shape) for t in targets),
                          c.basis, c.seed)
        for name, _, _, w in [t for t in targets if not A[:, : min(t[3].shape)].any()]:
            raise ValueError(f"the {c.basis} bases of seed {c.seed} are zero on A's columns of {name!r}, so its "
                             "update would stay zero; raise r, or change seed or basis")
        dts = {t[3].dtype for t in targets}                            # one dtype, or the widest (>= float32)
        dt = dts.pop() if len(dts) == 1 else max(dts | {torch.float32}, key=lambda d: torch.finfo(d).bits)
        shared = SharedBases(A.to(targets[0][3].device, dt), B.to(targets[0][3].device, dt), c)
    else:
        shared, gen = SharedBases(torch.empty(0), torch.empty(0), c), torch.Generator("cpu").manual_seed(c.seed)
    model.requires_grad_(False)
    for p in extra.values():
        p.requires_grad_(True)
    for i, (name, kind, mod, w) in enumerate(targets):
        if kind == "module":
            layer = (RandLoRALinear(mod, shared, c.r, c.alpha, c.dropout, c.scaling) if rand
                     else LoRALinear(mod, c.r, c.alpha, gen, c.dropout))
            _replace(model, mod, layer)
        else:
            layer = RandLoRA(w, shared, c.r, c.alpha, scaling=c.scaling) if rand else LoRA(w, c.r, c.alpha, gen)
            parametrize.register_parametrization(mod, name.rpartition(".")[2], layer)
        if i == 0:
            layer.shared_bases = shared                                # registered once, here
    return [t[0] for t in targets]

def add_randlora(model, target_modules, r, alpha, dropout=0.0, basis="uniform", seed=0, target_parameters=(),
                 trainable=(), scaling="paper") -> list:
    """Patch `model` in place: each nn.Linear / Conv1D named (exactly or by dotted suffix) in `target_modules`
    becomes a RandLoRALinear, each 2-D Parameter in `target_parameters` gets a RandLoRA parametrization; all else
    is frozen but the `trainable` modules (a head). `scaling` picks s and gam0 (the docstring's "paper" or
    "peft"). Returns the adapted names; bad input changes nothing."""
    c = AdapterConfig("randlora", r, alpha, basis, seed, dropout, target_modules, target_parameters, trainable,
                      scaling)
    return _patch(model, c)

def add_lora(model, target_modules, r, alpha, dropout=0.0, seed=0, target_parameters=(), trainable=()) -> list:
    """The LoRA baseline with the same targeting, freezing and errors as add_randlora."""
    c = AdapterConfig("lora", r, alpha, "none", seed, dropout, target_modules, target_parameters, trainable)
    return _patch(model, c)

def adapters(model) -> dict:
    """{adapted name: (update module, frozen base weight Parameter)} in model order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (RandLoRALinear, LoRALinear)):
            out[name] = (m, m.weight)
        for pname, plist in (m.parametrizations.items() if parametrize.is_parametrized(m) else ()):
            for u in [u for u in plist if isinstance(u, _Update)]:
                out[f"{name}.{pname}" if name else pname] = (u, plist.original)
    return out

def adapter_config(model) -> AdapterConfig:
    shared = [m.config for m in model.modules() if isinstance(m, SharedBases)] if adapters(model) else []
    if not shared:                                                      # (a part of a patched model has none)
        raise ValueError("no adapters with their bases in this model; patch it first, or pass the whole model")
    return shared[0]

def rank_for_budget(model, target_modules, lora_rank: int, target_parameters=()) -> int:
    """The RandLoRA r whose count sum n (r + k) is closest to LoRA's sum lora_rank (in + out) (ties: the smaller)."""
    _check_hparams(lora_rank, 1.0, 0.0, 0)
    ws = [t[3] for t in _find_targets(model, _as_names(target_modules, "target_modules"),
                                      _as_names(target_parameters, "target_parameters"))]
    budget = sum(lora_rank * sum(w.shape) for w in ws)
    count = lambda r: sum(math.ceil(min(w.shape) / r) * (r + min(w.shape)) for w in ws)
    return min(range(1, min(min(w.shape) for w in ws) + 1), key=lambda r: (abs(count(r) - budget), count(r)))

def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

# ---- Merge / unmerge: W <- W +/- DeltaW, computed in float32 (or wider) and rounded once ----

def _shifted(u, w, merge: bool) -> torch.Tensor:
    """W + DeltaW (merge), or W - the DeltaW of the last merge (unmerge)."""
    dt = _wide(w.dtype)
    return w.to(dt).add(u.delta_weight(at_merge=not merge).to(dt), alpha=1 if merge else -1).to(w.dtype)

@torch.no_grad()
def _set_merged(model, merged: bool) -> int:
    todo = {name: (u, w) for name, (u, w) in adapters(model).items() if u.merged != merged}
    holders = {}                                                        # storage -> names, each module once
    for mname, mod in model.named_modules():
        for pname, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is not None and t.numel():
                holders.setdefault(t.untyped_storage().data_ptr(), []).append(f"{mname}.{pname}".lstrip("."))
    for name, (u, w) in todo.items():                                  # check everything first
        tied = holders[w.untyped_storage().data_ptr()]
        if len(tied) > 1:
            raise ValueError(f"{tied[0]} and {tied[1]} are one tied tensor; merging {name!r} would change both. "
                             f"Untie them (assign a clone) or leave {name!r} out; unmerged, the model is correct")
        if not torch.isfinite(_shifted(u, w, merged)).all():
            raise ValueError(f"{'merging' if merged else 'unmerging'} {name!r} would give non-finite "
                             "weights; nothing was changed (check lam/gam and the weight's dtype range)")
    for u, w in todo.values():
        for key, p in _trainables(u).items() if merged else ():       # record what goes in
            getattr(u, key + "_merged").copy_(p)
        w.copy_(_shifted(u, w, merged))
        u.merged = merged
        u.merged_flag.fill_(merged)
    return len(todo)

def merge(model) -> int:
    """Fold every DeltaW into its base weight; layers then run at the base model's speed.
    Idempotent; returns how many layers changed. Refuses tied weights, changing nothing."""
    return _set_merged(model, True)

def unmerge(model) -> int:
    """Take out of every weight the DeltaW its merge put in (exact up to the dtype's rounding)."""
    return _set_merged(model, False)

def _unpatch(model, keep_update: bool) -> nn.Module:
    """The original modules back; raw weights keep their parametrizations' value (W + DeltaW, and any
    parametrization stacked after it) if `keep_update`, else their stored weight."""
    for name, (u, w) in adapters(model).items():
        if isinstance(u, (RandLoRALinear, LoRALinear)):
            _replace(model, u, u.synced_base())
        else:
            owner, _, attr = name.rpartition(".")
            parametrize.remove_parametrizations(model.get_submodule(owner), attr, leave_parametrized=keep_update)
    return model

def unload(model) -> nn.Module:
    """Merge, then give the plain model back: its original modules, no parametrizations, the base state_dict keys."""
    merge(model)                                                        # refuses tied weights
    return _unpatch(model, keep_update=True)

@contextlib.contextmanager
def disable_adapters(model):
    """Inside: the base model's function (bit for bit if unmerged), trainables not requiring grad. After: as before."""
    ups = [u for u, _ in adapters(model).values()]
    merged, grads = any(u.merged for u in ups), {p: p.requires_grad for u in ups for p in _trainables(u).values()}
    def switch(off: bool):
        for u in ups:
            u.disabled = off
        for p, wanted in grads.items():
            p.requires_grad_(wanted and not off)
    unmerge(model)
    try:
        switch(off=True)
        yield model
    finally:
        switch(off=False)
        if merged:
            merge(model)

# ---- Adapter checkpoints: the trainables, each layer's (out, in) and the config; never the bases ----

def _saved(model) -> dict:
    """{checkpoint key: Parameter}: every adapter's trainables, then the `trainable` modules' ones."""
    out = {f"{n}.{k}": p for n, (u, _) in adapters(model).items() for k, p in _trainables(u).items()}
    return {**out, **_extra_trainables(model, adapter_config(model).trainable)}

def _is_plain(d) -> bool:
    """A str-keyed dict of scalars and flat lists of them, <= 1 MiB of text: cheap to compare and repr."""
    if type(d) is not dict or not all(type(k) is str for k in d):
        return False
    cells = [x for v in d.values() for x in (v if type(v) is list else [v])]
    return sum(len(x) for x in cells if type(x) is str) <= 2**20 and all(
        type(x) in (str, bool, float) or type(x) is int and abs(x) <= 2**64 for x in cells)

def _header(model) -> dict:
    """A checkpoint's plain part: format version, config, and each layer's [out, in]."""
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(adapter_config(model)).items()}
    shapes = {n: list(w.shape[::-1] if u.fan_in_fan_out else w.shape) for n, (u, w) in adapters(model).items()}
    return {"format_version": FORMAT_VERSION, "config": config, "shapes": shapes}

def adapter_state_dict(model) -> dict:
    """{"format_version", "config", "shapes": {name: [out, in]}, "tensors": {"<name>.lam": (n, r),
    "<name>.gam": (n, k), ..}}: plain types and tensors, which torch.load(weights_only=True) reads."""
    return {**_header(model), "tensors": {key: p.detach().cpu().clone() for key, p in _saved(model).items()}}

def load_adapter_state_dict(model, state) -> None:
    """Load into a model patched with the same config and layer shapes. Everything is checked (shapes before
    values) before anything is copied; errors never repr the file's objects."""
    want, params = _header(model), _saved(model)                      # no copy of the tensors
    if any(u.merged for u, _ in adapters(model).values()):
        raise ValueError("the model is merged; call unmerge(model) before loading adapters")
    version = state.get("format_version") if isinstance(state, dict) and {"config", "tensors"} <= set(state) else None
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValueError(f"not an adapter checkpoint of format {FORMAT_VERSION}, the dict adapter_state_dict() writes "
                         "(format 1 had s = alpha / r and gam from 1/k, this one alpha / (r sqrt(n)) and 1/D)")
    saved, tensors = state["config"], state["tensors"]
    if not _is_plain(saved) or not isinstance(tensors, dict):
        raise ValueError("checkpoint 'config' must be a dict of numbers, strings and lists of them, 'tensors' a dict")
    for key in [k for k in ("method", "r", "alpha", "basis", "seed", "scaling") if saved.get(k) != want["config"][k]]:
        raise ValueError(f"checkpoint {key} differs from the model's {key}={want['config'][key]!r}; "
                         "patch a fresh model with the checkpoint's config")
    missing = [k for k in params if k not in tensors]
    extra = sorted(k[:80] if isinstance(k, str) else type(k).__name__ for k in tensors if k not in params)
    if missing or extra:
        raise ValueError(f"checkpoint does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
    if not _is_plain(state.get("shapes")) or state["shapes"] != want["shapes"]:
        raise ValueError(f"checkpoint was saved from layers of other (out, in) shapes than this model's "
                         f"{list(want['shapes'].items())[:5]}; load it into a model of the shapes it was trained on")
    for key, p in params.items():
        t = tensors[key]
        dense = isinstance(t, torch.Tensor) and t.layout == torch.strided and not (t.is_nested or t.is_meta)
        if not dense or not t.is_floating_point() or t.shape != p.shape or not torch.isfinite(t.to(p.dtype)).all():
            got = f"{t.dtype} of shape {tuple(t.shape)}" if dense else f"a {type(t).__name__}, not dense or on meta"
            raise ValueError(f"checkpoint entry {key!r} is {got} (or non-finite); the model expects a dense "
                             f"floating-point tensor of shape {tuple(p.shape)}")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key])

def save_adapter(model, path) -> None:
    torch.save(adapter_state_dict(model), path)

def load_adapter(model, path) -> None:
    """torch.load(weights_only=True) of a small file with sound zip records, then load_adapter_state_dict's checks;
    a model without adapters is first patched from the file's config (and unpatched if loading fails)."""
    patched, file = bool(adapters(model)), f"adapter checkpoint {str(path)!r}"
    limit = 8 * (sum(p.numel() for p in _saved(model).values()) if patched else    # 8 bytes an entry
                 2 * sum(p.numel() for p in model.parameters())) + 2**20          # (2 a parameter), + 1 MiB
    if os.path.getsize(path) > limit:                                   # before its zip directory is read
        raise ValueError(f"{file} is larger than the {limit} bytes this model's adapter can need")
    try:
        with zipfile.ZipFile(path) as z:                                # torch.load checks no CRC: testzip does
            rs = z.infolist()                                           # torch.load reads a "folder" record as junk
            bad = len({r.filename.lower() for r in rs}) < len(rs) or sum(r.file_size for r in rs) > limit
            if bad or any(r.compress_type or r.external_attr & 0x10 for r in rs):   # (testzip reads by name)
                raise ValueError(f"its records repeat a name, are compressed or folders, or exceed {limit} bytes")
            if z.testzip() is not None:
                raise ValueError("a record fails its CRC check: the file changed after torch.save wrote it")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                             # truncated, tampered, not torch
        raise ValueError(f"could not read {file}: the file is damaged or not written by save_adapter "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    config = state.get("config") if isinstance(state, dict) else None
    if not patched and not (_is_plain(config) and set(config) == {f.name for f in fields(AdapterConfig)}
                            and config["method"] in ("randlora", "lora")):
        raise ValueError(f"{file} has no config written by adapter_state_dict() to patch from")
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        if not patched:
            _patch(model, AdapterConfig(**{k: tuple(v) if type(v) is list else v for k, v in config.items()}))
        load_adapter_state_dict(model, state)
    except BaseException as e:
        if not patched and adapters(model):                            # patched here: undo it
            _unpatch(model, keep_update=False)                          # no merge: weights never touched
            for p, wanted in grads.items():
                p.requires_grad_(wanted)
        if isinstance(e, (RecursionError, MemoryError)):
            raise ValueError(f"{file} nests too deeply or is too large to check") from None
        raise
