"""Step time and activation memory of RandLoRA, LoRA and full fine-tuning, side by side in one run.

The model is a stack of transformer blocks reduced to their linear layers (ViT-B shapes by
default; `--shape llm` for LLM-like ones), every layer adapted:

    qkv   d -> 3d        h = q + k + v           (stands in for attention: no saved tensors)
    proj  d -> d         x = x + proj(h)
    fc1   d -> d_ff
    fc2   d_ff -> d      x = x + fc2(fc1(x))     (no GELU: it would cost every method the same)

Methods, each timed as one training step (forward, backward with a fixed output gradient, and
the optimizer step where there is something to train):

    frozen            all weights frozen, input gradients only: the floor of any adapter
    lora              LoRA rank 32 on every layer, AdamW over its factors
    randlora          RandLoRA at the rank with LoRA-32's parameter count (rank_for_budget)
    randlora_vsparse  the same with very sparse ternary bases (paper sec. 6.4)
    full              full fine-tuning, AdamW over every weight

x requires grad in every method, as it does for layers in the middle of a deeper network.
AdamW is the fused CPU kernel where torch has it (much faster than the default for-loop one,
so full fine-tuning is not slowed by its optimizer). Times are medians over `repeats` steps
after `warmup` steps, with the methods interleaved round-robin (the order rotated every
round) so that load from other processes falls on all of them alike; ratios are taken within
the run. Activation bytes are counted exactly with saved_tensors_hooks (see `saved_bytes`).
Merged inference compares `randlora.merge(model)` against the unpatched base model under
torch.no_grad, with 3x the repeats (the two do the same work, so only noise separates them).

    python bench.py [--shape vit|llm] [--blocks N] [--tokens 256 1600 6400] [--repeats 5]
                    [--warmup 1] [--methods ...] [--quick] [--json FILE] [--impl PATH/TO/variant.py]

Targets (issue 5), marked pass/miss from the numbers: saved bytes RandLoRA <= LoRA at every T;
step time RandLoRA <= 1.3x LoRA at T = 6400, <= 1.9x at 1600, <= 2.5x at 256, and <= 1.1x
full fine-tuning at 6400; merged inference within 3% of the base model.

[1] Albert et al., RandLoRA, ICLR 2025, arXiv 2502.00987 (sec. 6.4, 6.6 and app. C.6.1).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

# On a shared machine, OpenMP threads that spin while waiting stall whenever another process
# holds a core: a small-op step (LoRA at T = 64) then runs 10-20x slower and at random. Waiting
# passively keeps the ratios honest. Only effective before torch is imported; set it to
# override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

SHAPES = {                                    # d, d_ff, blocks
    "vit": dict(d=768, d_ff=3072, blocks=4),  # ViT-B/16
    "llm": dict(d=2048, d_ff=5632, blocks=1), # a 1B-class decoder's widths (e.g. TinyLlama)
}
TARGETS = ("qkv", "proj", "fc1", "fc2")
METHODS = ("frozen", "lora", "randlora", "randlora_vsparse", "full")
LORA_RANK = 32
TOKENS = (256, 1600, 6400)
STEP_TARGETS = {6400: 1.3, 1600: 1.9, 256: 2.5}   # RandLoRA step time / LoRA's, at most
FULL_TARGET = (6400, 1.1)                          # RandLoRA / full fine-tuning at T, at most
MERGED_TARGET = 1.03                               # merged inference / base model, at most


# ----------------------------------------------------------------------------------------
# The model


class Block(nn.Module):
    def __init__(self, d, d_ff):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x):                                              # (T, d)
        q, k, v = self.qkv(x).chunk(3, dim=-1)                         # 3 x (T, d), views
        x = x + self.proj(q + k + v)                                   # (T, d)
        return x + self.fc2(self.fc1(x))                               # (T, d)


def make_model(shape="vit", blocks=None, seed=0) -> nn.Module:
    cfg = SHAPES[shape]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(*(Block(cfg["d"], cfg["d_ff"]) for _ in range(blocks or cfg["blocks"])))


def load_impl(path=None):
    """randlora itself, or (for A/B runs of a modified copy) the module in the file `path`."""
    path = path or os.environ.get("RANDLORA_IMPL")
    if not path:
        import randlora
        return randlora
    name = "randlora_impl_" + os.path.splitext(os.path.basename(path))[0]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise ValueError(f"--impl {path!r} is not a Python file")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod                                            # dataclasses look it up
    spec.loader.exec_module(mod)
    return mod


def adamw(params):
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError, ValueError):                       # no fused kernel here
        return torch.optim.AdamW(params, lr=1e-4)


def build(method, base, R):
    """(model, optimizer or None) for one method, from a deep copy of the base model."""
    model = copy.deepcopy(base)
    if method == "frozen":
        model.requires_grad_(False)
        return model, None
    if method == "full":
        model.requires_grad_(True)
        return model, adamw(model.parameters())
    if method == "lora":
        R.add_lora(model, TARGETS, r=LORA_RANK, alpha=2 * LORA_RANK)
    elif method in ("randlora", "randlora_vsparse"):
        r = R.rank_for_budget(model, TARGETS, LORA_RANK)
        basis = "very_sparse" if method == "randlora_vsparse" else "uniform"
        R.add_randlora(model, TARGETS, r=r, alpha=2 * r, basis=basis)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return model, adamw(p for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------
# Measurements


def saved_bytes(model, x) -> int:
    """Bytes that autograd keeps alive for backward after one forward of `model` on `x`.

    The rule: every tensor handed to a saved_tensors_hook is counted by its storage, once per
    storage (the same tensor, or two views of one tensor, saved twice counts once), at the
    storage's full size (a saved view keeps all of it alive); storages that belong to a
    parameter or buffer of the model are not counted (they exist anyway: a frozen nn.Linear
    saves W^T, a view of W)."""
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in owned:
            seen[st.data_ptr()] = st.nbytes()                           # all alive until backward
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    del y
    return sum(seen.values())


def make_step(model, opt, x, gy):
    def step():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        x.grad = None
        model(x).backward(gy)
        if opt is not None:
            opt.step()
    return step


def interleaved(fns: dict, repeats: int, warmup: int) -> dict:
    """{name: {"wall": [s], "cpu": [s]}} per call: every round calls each fn once, the order
    rotated per round. "cpu" is this process's CPU time (all threads): the work done, which
    other processes on the machine disturb much less than the wall-clock time."""
    names, times = list(fns), {n: {"wall": [], "cpu": []} for n in fns}
    for i in range(warmup + repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i >= warmup:
                times[name]["wall"].append(dt)
                times[name]["cpu"].append(dc)
    return times


def _medians(times, key):
    return {name: statistics.median(t[key]) for name, t in times.items()}


def run(shape="vit", tokens=TOKENS, repeats=5, warmup=1, quick=False, impl=None, blocks=None,
        methods=METHODS, seed=0, log=None) -> list:
    """One row per (T, method): training step rows (kind "train") and merged-inference rows
    (kind "infer", methods "base" and "merged"). `quick`: one block, 2 repeats. Ratios (x_*)
    are of median wall-clock times, cpu_x_* of median CPU times, within this run."""
    R = load_impl(impl)
    if quick:
        blocks, repeats, warmup = blocks or 1, min(repeats, 2), min(warmup, 1)
    base = make_model(shape, blocks, seed)
    models = {m: build(m, base, R) for m in methods}
    infer = None
    if "randlora" in methods:                                          # a trained-looking update
        merged = copy.deepcopy(models["randlora"][0])
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for u, _ in R.adapters(merged).values():
                u.lam.copy_(1e-3 * torch.randn(u.lam.shape, generator=g))
        R.merge(merged)
        infer = {"base": copy.deepcopy(base).requires_grad_(False), "merged": merged.requires_grad_(False)}
    d = SHAPES[shape]["d"]
    rows = []
    for T in tokens:
        g = torch.Generator().manual_seed(seed + T)
        x = torch.randn(T, d, generator=g).requires_grad_(True)        # (T, d)
        gy = torch.randn(T, d, generator=g)                            # (T, d) fixed output grad
        steps = {m: make_step(model, opt, x, gy) for m, (model, opt) in models.items()}
        times = interleaved(steps, repeats, warmup)
        med, cpu = _medians(times, "wall"), _medians(times, "cpu")
        ratio = lambda d, m, ref: d[m] / d[ref] if ref in d else None
        for m, (model, opt) in models.items():
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            rows.append(dict(
                kind="train", shape=shape, T=T, method=m, ms=1e3 * med[m], cpu_ms=1e3 * cpu[m],
                times_ms=[1e3 * t for t in times[m]["wall"]],
                x_lora=ratio(med, m, "lora"), x_full=ratio(med, m, "full"),
                cpu_x_lora=ratio(cpu, m, "lora"), cpu_x_full=ratio(cpu, m, "full"),
                trainable=n_train, saved_bytes=saved_bytes(model, x),
                paths=resolved_paths(model, T, R)))
        if infer is not None:
            xs = x.detach()
            fns = {k: (lambda mdl=mdl: _no_grad_forward(mdl, xs)) for k, mdl in infer.items()}
            times = interleaved(fns, 3 * repeats, warmup)              # same work: a finer look
            med, cpu = _medians(times, "wall"), _medians(times, "cpu")
            for k in infer:
                rows.append(dict(kind="infer", shape=shape, T=T, method=k, ms=1e3 * med[k], cpu_ms=1e3 * cpu[k],
                                 times_ms=[1e3 * t for t in times[k]["wall"]],
                                 x_base=med[k] / med["base"], cpu_x_base=cpu[k] / cpu["base"]))
        if log:
            log(f"T={T} done")
    return rows


def resolved_paths(model, T, R):
    """{layer type: path} that "auto" resolves to at T tokens (None for non-RandLoRA models)."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lam") and hasattr(mod, "path"):
            args = (T, mod.D, mod.k, mod.n * mod.r, mod.transposed)
            sp = mod._shared.sparse_operands(mod.n, mod.D) if hasattr(mod._shared, "sparse_operands") else None
            if mod.path != "auto":
                path = mod.path
            elif sp is None:
                path = R.choose_path(*args)
            else:                                                      # CSR bases (proposed fast path)
                path = R.choose_path(*args, True, sp[0].values().numel() / (mod.D * mod.n * mod.r))
            out.setdefault(name.rsplit(".", 1)[-1], set()).add(path)
    return {k: "+".join(sorted(v)) for k, v in out.items()} or None


def _no_grad_forward(model, x):
    with torch.no_grad():
        model(x)


def checks(rows) -> list:
    """The issue's targets, each as {target, T, method, value, limit, ok}, from the rows."""
    train = {(r["T"], r["method"]): r for r in rows if r["kind"] == "train"}
    out = []
    for method in ("randlora", "randlora_vsparse"):
        for T in sorted({r["T"] for r in rows}):
            row, lora = train.get((T, method)), train.get((T, "lora"))
            if row is None or lora is None:
                continue
            out.append(dict(target="saved bytes <= LoRA", T=T, method=method,
                            value=row["saved_bytes"] / lora["saved_bytes"], limit=1.0))
            if T in STEP_TARGETS:
                out.append(dict(target="step time / LoRA", T=T, method=method, value=row["x_lora"],
                                cpu=row.get("cpu_x_lora"), limit=STEP_TARGETS[T]))
            if T == FULL_TARGET[0] and row["x_full"] is not None:
                out.append(dict(target="step time / full FT", T=T, method=method, value=row["x_full"],
                                cpu=row.get("cpu_x_full"), limit=FULL_TARGET[1]))
    for r in rows:
        if r["kind"] == "infer" and r["method"] == "merged":
            out.append(dict(target="merged inference / base", T=r["T"], method="randlora",
                            value=r["x_base"], cpu=r.get("cpu_x_base"), limit=MERGED_TARGET))
    for c in out:
        c["ok"] = c["value"] <= c["limit"]
    return out


def _fmt_bytes(n):
    return f"{n / 2**20:.1f} MiB"


def table(rows, check_rows) -> str:
    fx = lambda v: "-" if v is None else f"{v:.2f}"
    lines = [f"{'T':>5} {'method':<17} {'step ms':>9} {'x LoRA':>7} {'x full':>7} {'cpu x LoRA':>10} {'cpu x full':>10}"
             f" {'trainable':>11} {'saved':>11}  paths"]
    for r in rows:
        if r["kind"] != "train":
            continue
        paths = " ".join(f"{k}:{v[:3]}" for k, v in r["paths"].items()) if r["paths"] else ""
        lines.append(f"{r['T']:>5} {r['method']:<17} {r['ms']:>9.1f} {fx(r['x_lora']):>7} {fx(r['x_full']):>7} "
                     f"{fx(r.get('cpu_x_lora')):>10} {fx(r.get('cpu_x_full')):>10} "
                     f"{r['trainable']:>11,} {_fmt_bytes(r['saved_bytes']):>11}  {paths}")
    inf = [r for r in rows if r["kind"] == "infer"]
    if inf:
        lines += ["", f"{'T':>5} {'inference':<17} {'ms':>9} {'x base':>7} {'cpu x base':>10}"]
        lines += [f"{r['T']:>5} {r['method']:<17} {r['ms']:>9.1f} {r['x_base']:>7.3f} {r.get('cpu_x_base', 0):>10.3f}"
                  for r in inf]
    if check_rows:
        lines += ["", "targets (issue 5), on wall-clock medians (CPU-time ratio in brackets)"]
        for c in check_rows:
            cpu = f" [cpu {c['cpu']:.3f}]" if c.get("cpu") is not None else ""
            lines.append(f"  {'pass' if c['ok'] else 'MISS'}  {c['target']:<24} T={c['T']:<5} {c['method']:<17} "
                         f"{c['value']:.3f} (limit {c['limit']:g}){cpu}")
    return "\n".join(lines)


def environment() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return dict(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
                cpus=os.cpu_count(), machine=platform.machine(), loadavg=load,
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="vit")
    p.add_argument("--blocks", type=int, default=None, help="override the shape's block count")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help=f"T values (default {TOKENS})")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--quick", action="store_true", help="smoke run: one block, T = 64 and 256, 2 repeats")
    p.add_argument("--json", metavar="FILE", help="write rows, checks and environment here")
    p.add_argument("--impl", metavar="PATH", help="benchmark another copy of randlora.py (A/B runs)")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.warmup < 0 or (a.tokens and min(a.tokens) < 1):
        p.error("--repeats must be >= 1, --warmup >= 0 and every --tokens value >= 1")
    if "lora" not in a.methods or "full" not in a.methods:
        p.error("--methods must include lora and full: every ratio is taken against them")
    tokens = tuple(a.tokens) if a.tokens else ((64, 256) if a.quick else TOKENS)
    if a.quick:
        a.repeats, a.warmup = min(a.repeats, 2), min(a.warmup, 1)
    env = environment()
    print(f"bench.py shape={a.shape} tokens={tokens} repeats={a.repeats} warmup={a.warmup}"
          f"{' quick' if a.quick else ''}  torch {env['torch']}, {env['threads']} threads, load {env['loadavg']}",
          flush=True)
    t0 = time.time()
    rows = run(a.shape, tokens, a.repeats, a.warmup, a.quick, a.impl, a.blocks, tuple(a.methods),
               log=lambda s: print(f"  {s} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True))
    env["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    env["seconds"] = time.time() - t0
    cs = checks(rows)
    print(table(rows, cs))
    print(f"\n{env['seconds']:.0f} s; load average before {env['loadavg']}, after {env['loadavg_after']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(argv=sys.argv[1:] if argv is None else list(argv), environment=env,
                           rows=rows, checks=cs), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
