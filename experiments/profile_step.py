"""Steady-state training throughput of one model on CPU: cnnjax variants vs PyTorch eager.

Every variant runs in a fresh subprocess (XLA reads XLA_FLAGS once, at backend start), and so
does PyTorch (its thread pool would compete with XLA's on the same cores). Rounds alternate the
processes (A, B, ..., torch, A, B, ..., torch) so that machine noise hits all of them alike; the
reported number is the median images/s over every timed window of every round.

    python experiments/profile_step.py --model simple_cnn --batch-size 128 \
        --variant baseline fast_pool ynn_flags fast

Also prints the float32 matmul peak (jnp.dot and torch.mm, 2048x2048), the per-image training
FLOPs from XLA's cost analysis and the resulting model-FLOP utilisation (MFU).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

YNN = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"
# name -> (max pool implementation, extra XLA_FLAGS, extra environment)
VARIANTS = {
    "baseline": ("nn", "", {}),
    "fast_pool": ("fast", "", {}),
    "ynn_flags": ("nn", YNN, {}),
    "fast": ("fast", YNN, {}),
    "fast_runtime": ("fast", "runtime", {}),  # flags from cnnjax.cli.configure_xla()
    "fast_fastmath": ("fast", YNN + " --xla_cpu_enable_fast_math=true", {}),
    "fast_no_ynn": ("fast", "--xla_cpu_experimental_ynn_fusion_type=", {}),
    "fast_ynn_dot_only": ("fast", "--xla_cpu_experimental_ynn_fusion_type=dot", {}),
    "fast_xnn": ("fast", YNN + " --xla_cpu_use_xnnpack=true", {}),
    "fast_onednn": ("fast", YNN + " --xla_cpu_use_onednn=true", {}),
    "fast_no_mt_eigen": ("fast", YNN + " --xla_cpu_multi_thread_eigen=false", {}),
    "fast_concurrency_sched": (
        "fast",
        YNN + " --xla_cpu_enable_concurrency_optimized_scheduler=true",
        {},
    ),
    "fast_omp1": ("fast", YNN, {"OMP_NUM_THREADS": "1"}),
    # YNNPACK without its elementwise fusions (checked in the compiled HLO): a forward
    # convolution fused with its bias add then runs on Eigen too, and a ReLU's zero is no
    # longer materialised as a full-size operand of a YNN fusion.
    "fast_ynn_dot_reduce": ("fast", "--xla_cpu_experimental_ynn_fusion_type=dot,reduce", {}),
    "fast_ynn_reduce_only": ("fast", "--xla_cpu_experimental_ynn_fusion_type=reduce", {}),
    "fast_memory_sched": (
        "fast",
        YNN + " --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
        {},
    ),
    "fast_opt_runtime": ("fast", YNN + " --xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME", {}),
}
TORCH = "torch"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="simple_cnn", choices=["simple_cnn", "fast_cnn", "resnet20"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="train steps per timed window")
    p.add_argument("--windows", type=int, default=15, help="timed windows per variant")
    p.add_argument("--variant", nargs="+", default=["baseline", "fast"], choices=list(VARIANTS))
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a variant name, or "torch"
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------- JAX worker


def jax_worker(args):
    """Builds and compiles the variant's step; returns (info, run_one_window)."""
    pool, flags, _ = VARIANTS[args.worker]
    if flags == "runtime":
        from cnnjax import cli

        cli.configure_xla()
    import jax

    if pool == "nn":
        import flax.linen as nn

        import cnnjax.nn.layers

        cnnjax.nn.layers.max_pool = lambda x, w, s, p: nn.max_pool(x, w, s, p)
    step, state, batches = build_jax_step(args.model, args.batch_size)
    flops = _cost_flops(step.lower(state, *batches[0]).compile())
    holder = {"state": state}

    def window():
        state = holder["state"]
        for i in range(args.steps):
            state, loss = step(state, *batches[i % len(batches)])
        jax.block_until_ready((state, loss))  # the only sync in a window
        holder["state"] = state

    info = {
        "flops_per_image": flops / args.batch_size if flops else None,
        "peak_gflops": matmul_peak_jax(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    return info, window


def build_jax_step(model_name: str, batch_size: int, num_batches: int = 4):
    """A jitted Adam step (state donated) and ``num_batches`` device-resident synthetic batches."""
    import jax
    import jax.numpy as jnp
    import optax

    from cnnjax import models

    model = models.get(model_name, num_classes=10)
    key = jax.random.key(0)
    x = jax.random.normal(key, (num_batches, batch_size, 28, 28, 1))
    y = jax.random.randint(key, (num_batches, batch_size), 0, 10)
    variables = model.init(key, x[0], train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.adam(1e-3)
    state = (jnp.zeros((), jnp.int32), params, tx.init(params), batch_stats)

    def loss_fn(params, batch_stats, step, xb, yb):
        rngs = {"dropout": jax.random.fold_in(key, step)}
        if batch_stats:
            v = {"params": params, "batch_stats": batch_stats}
            logits, upd = model.apply(v, xb, train=True, mutable=["batch_stats"], rngs=rngs)
            batch_stats = upd["batch_stats"]
        else:
            logits = model.apply({"params": params}, xb, train=True, rngs=rngs)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return loss, batch_stats

    def train_step(state, xb, yb):
        step, params, opt_state, batch_stats = state
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, batch_stats), grads = grad_fn(params, batch_stats, step, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (step + 1, params, opt_state, batch_stats), loss

    batches = [(x[i], y[i]) for i in range(num_batches)]
    return jax.jit(train_step, donate_argnums=0), state, batches


def _cost_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def matmul_peak_jax(n: int = 2048, reps: int = 10) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = min(_timed(lambda: dot(a, a).block_until_ready()) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --------------------------------------------------------------------------------- torch worker


def torch_model(name: str):
    """The same architectures as cnnjax's registry, in PyTorch (NCHW, eager)."""
    from torch import nn

    if name == "simple_cnn":
        return nn.Sequential(
            *[nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)],
            *[nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)],
            *[nn.Flatten(), nn.Linear(7 * 7 * 64, 128), nn.ReLU(), nn.Linear(128, 10)],
        )
    if name == "fast_cnn":
        return _torch_fast_cnn()
    return _torch_resnet20()


def _torch_fast_cnn(widths=(64, 128, 128), stem=24):
    from torch import nn

    def conv_bn(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout, momentum=0.2)]

    gelu = nn.GELU(approximate="tanh")  # flax's nn.gelu default
    layers, cin = [*conv_bn(1, stem), gelu], stem
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.MaxPool2d(2)]
        layers += [nn.BatchNorm2d(w, momentum=0.2), gelu, *conv_bn(w, w), gelu]
        cin = w
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(cin, 10, bias=False)]
    return nn.Sequential(*layers)


def _torch_resnet20():
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x):
            y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
            s = x[:, :, :: self.stride, :: self.stride]
            s = F.pad(s, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
            return F.relu(y + s)

    layers, cin = [nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for i, w in enumerate((16, 32, 64)):
        for j in range(3):
            layers.append(Block(cin, w, 2 if i and not j else 1))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    torch.manual_seed(0)
    return nn.Sequential(*layers)


def torch_worker(args):
    """Builds the PyTorch model and optimiser; returns (info, run_one_window)."""
    import torch

    torch.set_num_threads(os.cpu_count())
    model = torch_model(args.model).train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    # Separate tensors: a view into one (4, N, ...) tensor (storage offset != 0) sends
    # PyTorch's conv down a ~6x slower path on this machine.
    xs = [torch.randn(args.batch_size, 1, 28, 28) for _ in range(4)]
    ys = [torch.randint(0, 10, (args.batch_size,)) for _ in range(4)]

    def window():
        for i in range(args.steps):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(xs[i % 4]), ys[i % 4])
            loss.backward()
            opt.step()
        loss.item()

    a = torch.randn(2048, 2048)
    torch.mm(a, a)
    best = min(_timed(lambda: torch.mm(a, a)) for _ in range(10))
    return {"peak_gflops": 2 * 2048**3 / best / 1e9, "threads": torch.get_num_threads()}, window


def serve(args) -> None:
    """Worker loop: set up, warm up, then time one window per "w" line read from stdin."""
    info, window = (torch_worker if args.worker == TORCH else jax_worker)(args)
    window()  # warm-up (compiles, allocator, caches): never timed
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() != "w":
            break
        print(json.dumps({"t": _timed(window)}), flush=True)


# ---------------------------------------------------------------------------------------- driver


def start_worker(args, name: str) -> subprocess.Popen:
    env = dict(os.environ)
    if name != TORCH:
        _, flags, extra = VARIANTS[name]
        env.update(extra)
        env["XLA_FLAGS"] = "" if flags == "runtime" else flags
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--worker", name, "--model", args.model]
    cmd += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _request(proc: subprocess.Popen, line: str | None) -> dict | None:
    if line is not None:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
    out = proc.stdout.readline()
    return json.loads(out) if out else None


def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def collect(args) -> dict[str, dict]:
    """Starts every worker (one at a time, so compiles do not overlap), then times windows
    round-robin: A, B, ..., torch, A, B, ... Only one worker computes at any moment."""
    names = list(args.variant) + ([] if args.no_torch or not torch_available() else [TORCH])
    procs, results = {}, {}
    for name in names:
        procs[name] = start_worker(args, name)
        info = _request(procs[name], None)
        results[name] = {"ips": [], **(info or {"error": "worker failed to start"})}
    for _ in range(args.windows):
        for name, proc in procs.items():
            if "error" not in results[name]:
                res = _request(proc, "w") or {}
                if "t" in res:
                    results[name]["ips"].append(args.batch_size * args.steps / res["t"])
                else:
                    results[name]["error"] = "worker died"
    for proc in procs.values():
        if proc.poll() is None:
            proc.stdin.close()  # ends the worker's read loop
        proc.wait()
    return results


def print_table(args, results: dict[str, dict]) -> None:
    peak = max((r.get("peak_gflops") or 0 for r in results.values()), default=0)
    torch_ips = statistics.median(results[TORCH]["ips"]) if results.get(TORCH, {}).get("ips") else 0
    print(
        f"model={args.model} batch={args.batch_size} steps/window={args.steps} "
        f"windows={args.windows} (round-robin) cpus={os.cpu_count()}"
    )
    print(f"{'variant':<24}{'images/s':>10}{'min':>9}{'max':>9}{'vs torch':>10}{'MFU':>7}")
    for name, res in results.items():
        if not res["ips"]:
            print(f"{name:<24} failed: {res.get('error')}")
            continue
        med = statistics.median(res["ips"])
        ratio = f"{med / torch_ips:.2f}x" if torch_ips else "-"
        fpi = res.get("flops_per_image")
        mfu = f"{100 * med * fpi / (peak * 1e9):.0f}%" if fpi and peak else "-"
        print(
            f"{name:<24}{med:>10.0f}{min(res['ips']):>9.0f}{max(res['ips']):>9.0f}"
            f"{ratio:>10}{mfu:>7}"
        )
    _print_footer(results)


def _print_footer(results: dict[str, dict]) -> None:
    jax_res = next((r for n, r in results.items() if n != TORCH and r.get("peak_gflops")), {})
    if jax_res:
        fpi = jax_res.get("flops_per_image")
        print(f"train FLOPs/image (XLA cost analysis): {fpi / 1e6:.1f} MFLOP" if fpi else "")
        print(f"matmul peak fp32 2048^2: jnp.dot {jax_res['peak_gflops']:.0f} GFLOP/s", end="")
    if results.get(TORCH, {}).get("peak_gflops"):
        print(f", torch.mm {results[TORCH]['peak_gflops']:.0f} GFLOP/s", end="")
    print("\nMFU = images/s x FLOPs/image (XLA's count for every row) / the best matmul peak")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        serve(args)
        return
    results = collect(args)
    fpi = next((r.get("flops_per_image") for r in results.values() if r.get("flops_per_image")), 0)
    if TORCH in results:
        results[TORCH]["flops_per_image"] = fpi
    print_table(args, results)


if __name__ == "__main__":
    main()
