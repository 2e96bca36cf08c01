"""Memory, step time and compile time of one model under every configuration, in one run.

    python benchmarks/memory_time.py --model bert-base            # -> results/memory_time-bert-base.{json,csv}

Configurations (same model weights, batch and seed; common.configurations): eager PyTorch;
the exact frontier: torch.compile (Inductor) with torch._functorch.config.activation_memory_budget
1.0 / 0.5 / 0.3 / 0.1; the wtacrs frontier: backend="wtacrs" in compute mode (ratio 0.3) with
memory_budget 1.0 / 0.5 / 0.3 / 0.1 ("wtacrs default" is budget 0.1, the defaults), the
defaults at ratio 0.1, and (unless --no-modes) memory mode at budgets 1.0 and 0.1 and the
paper's forward draws (mode "all").

Figures per configuration:
- saved_bytes: saved-activation bytes read off the backward graph Inductor compiled (inputs of
  the backward graph that are neither tangents, parameters, inputs nor views of them), summed
  over graphs.  Eager has no graph: its figure is the unique storages autograd saved
  (saved_tensors_hooks), parameters and inputs left out.
- compile_s: wall time of the first step (compiles forward and backward) minus the median step.
  Inductor's cache directory is fresh per run; a later configuration may still reuse a kernel
  an earlier one compiled.
- step_ratio: median step time (zero_grad, forward, backward, SGD step) over interleaved
  rounds after warm-up, divided by Inductor's median in the same run; its spread is the
  ratio in each round (step_ratio_per_round, min and max).
- step_ratio_ci95: a 95 % bootstrap interval of step_ratio (rounds resampled with
  replacement, Inductor's and the configuration's steps of a round kept together): how well
  the median ratio is known from this many rounds.  On the shared 2-core machine this work
  ran on, a one-thread matmul loop's speed drifts by +-15 % over seconds with its CPU time
  equal to its wall time (the host's speed, not descheduling), so no clock removes the
  noise; rounds do.
- cpu_ratio: the same ratio of the process's CPU time per step (time.process_time, every
  thread); with --threads 1 it differs from wall time only by time spent descheduled, with
  several threads it also counts OpenMP's spin-waits.
- peak_step_bytes (CPU): after warm-up and the timed rounds, the process's RSS right before a
  step is the baseline, the peak-RSS counter is reset (/proc/self/clear_refs) and one step
  runs: its peak RSS minus the baseline (includes the gradients the step allocates).  glibc's
  mmap threshold is fixed (MALLOC_MMAP_THRESHOLD_, the script re-executes itself with it) so
  freed tensors return to the OS instead of staying cached; that costs every large tensor
  page faults, so the step times of such a run are not a user's (settings.malloc_mmap_threshold
  says which allocator a run timed): time with --no-peak or --peak-subprocess, which leave
  the timed process's allocator alone.  --peak-subprocess measures each
  configuration in a fresh subprocess instead (after setup and two warm-up steps; compiles
  everything twice).
  On CUDA: torch.cuda.max_memory_allocated of the step minus memory allocated before it.
- forward_flops, backward_flops: FLOPs of the matmul-class ops (mm, addmm, bmm, attention) of
  the compiled forward and backward graphs, by torch.utils.flop_counter's formulas on the
  graphs' fake values; a budget's recomputed matmuls count in the backward.
- max_batch_under_cap: largest batch whose saved activations fit --cap-gib, from the saved
  bytes per sample (saved activations are linear in the batch).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import RESULTS, ROOT, DEFAULT_SHAPES, MODELS  # noqa: E402  (no torch import yet)


def _cache_dir(model: str) -> Path:
    return RESULTS / "tmp" / f"inductor-cache-{model}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, required=True)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int, help="tokens (BERT/MiniLM/T5 encoder); ViT is 197")
    p.add_argument("--layers", type=int, help="fewer layers than the real shape (said so in the output)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved timed rounds after warm-up; 0: no step times (bytes and FLOPs only, "
                        "for a machine that is not quiet)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int,
                   help="torch.set_num_threads before anything compiles (Inductor's kernels take it); "
                        "1 makes the CPU-time ratio the step's work")
    p.add_argument("--cap-gib", type=float, default=8.0, help="saved-activation cap for max_batch_under_cap")
    p.add_argument("--no-modes", action="store_true", help="only ratios, no planner modes")
    p.add_argument("--no-peak", action="store_true", help="skip the peak-RSS measurement")
    p.add_argument("--peak-subprocess", action="store_true",
                   help="peak RSS of each configuration in a fresh subprocess (compiles everything twice)")
    p.add_argument("--peak-skip-modes", action="store_true",
                   help="peak RSS only for the configurations without a planner mode or budget variant (saves compiles)")
    p.add_argument("--only", help="comma-separated configuration names")
    p.add_argument("--out", help="results file stem (default results/memory_time-<model>)")
    p.add_argument("--peak-config", help=argparse.SUPPRESS)  # subprocess mode
    args = p.parse_args()
    batch, seq = DEFAULT_SHAPES[args.model]
    args.batch = args.batch or batch
    args.seq = args.seq or seq

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_cache_dir(args.model)))
    # glibc: a fixed mmap threshold returns freed tensors to the OS, so RSS tracks live memory
    # (re-exec so the allocator starts with it).  Only where this process measures the peak:
    # every tensor over the threshold is then a fresh mmap whose pages the kernel faults in and
    # zeroes on first touch, which a training process does not pay (glibc's dynamic threshold
    # reuses freed blocks) and which moved the step-time ratios by more than the draws do
    # (results/memory_time-minilm-48rounds: the default 1.21x with it, against 0.86x in a
    # profile without it).  Timed rounds run with the allocator as a user has it.
    fixed_threshold = args.peak_config or not (args.no_peak or args.peak_subprocess)
    if fixed_threshold and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "131072":
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve())] + sys.argv[1:], env)
    if args.peak_config:
        return peak_subprocess(args)
    cache = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    if cache == _cache_dir(args.model) and cache.exists():
        shutil.rmtree(cache)
    run(args)


def bootstrap_ci(times, ref, draws: int = 2000, seed: int = 0):
    """95 % interval of median(times) / median(ref) over rounds resampled with replacement
    (the two lists are paired by round)."""
    import random

    rng = random.Random(seed)
    n = len(times)
    ratios = []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(times[i] for i in idx) / statistics.median(ref[i] for i in idx))
    ratios.sort()
    return [ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]]


def clock_figures(clock: str, samples, ref) -> dict:
    """One clock's figures for a configuration (``clock``: "step" for wall time, "cpu"):
    the median and every round, and against Inductor's rounds ``ref`` (when timed) the ratio
    of medians, the ratio in each interleaved round (same round, same machine load: the
    spread) and the bootstrap interval."""
    out = {f"{clock}_s_median": statistics.median(samples), f"{clock}_s_all": samples,
           f"{clock}_ratio_vs_inductor": None}
    if ref:
        out[f"{clock}_ratio_vs_inductor"] = out[f"{clock}_s_median"] / statistics.median(ref)
        per_round = sorted(t / i for t, i in zip(samples, ref))
        out[f"{clock}_ratio_per_round"] = per_round
        out[f"{clock}_ratio_min_max"] = [per_round[0], per_round[-1]]
        out[f"{clock}_ratio_ci95"] = bootstrap_ci(samples, ref)
    return out


def _step(fn, data, model, opt):
    opt.zero_grad(set_to_none=True)
    loss = fn(**data)
    loss.backward()
    opt.step()
    return loss


def run(args) -> None:
    import torch
    import copy

    import common

    if args.threads:
        torch.set_num_threads(args.threads)
    common.raise_recompile_limits()
    configs = common.configurations(modes=not args.no_modes)
    if args.only:
        keep = {s.strip() for s in args.only.split(",")}
        configs = [c for c in configs if c["name"] in keep or c["name"] == "inductor"]
    base_model, data, desc = common.build_model(args.model, args.batch, args.seq, args.layers)
    n_params = sum(p.numel() for p in base_model.parameters())
    print(f"{args.model}: {desc}; batch {args.batch}, {n_params / 1e6:.1f}M parameters", flush=True)

    # One-time Inductor start-up (worker pool, C++ toolchain probe) would land on whichever
    # configuration compiles first: pay it on a throwaway function.
    warm = torch.nn.Linear(8, 8)
    torch.compile(warm)(torch.randn(4, 8)).sum().backward()

    entries = []
    for cfg in configs:
        entry = {"config": cfg, "name": cfg["name"], "status": "ok"}
        entries.append(entry)
        model = copy.deepcopy(base_model)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        try:
            if cfg["kind"] == "eager":
                entry["saved_bytes"] = common.eager_saved_bytes(model, data)
                entry["saved_bytes_source"] = "eager autograd saved tensors (unique storages)"
            fn, rec = common.compile_config(model, cfg)
            torch.manual_seed(0)
            t0 = time.perf_counter()
            _step(fn, data, model, opt)
            entry["first_step_s"] = time.perf_counter() - t0
            if rec is not None:
                entry.update(rec.totals())
                entry["saved_bytes_source"] = "compiled backward graph"
            entry["_run"] = (fn, model, opt)
            print(f"  {cfg['name']:<28} first step {entry['first_step_s']:7.1f} s  "
                  f"saved {entry.get('saved_bytes', 0) / 2**20:8.1f} MiB", flush=True)
        except Exception as e:  # recorded, not fatal: the other configurations still run
            entry["status"] = "failed"
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc()[-4000:]
            print(f"  {cfg['name']:<28} FAILED {entry['error'][:200]}", flush=True)

    live = [e for e in entries if "_run" in e]
    for _ in range(args.warmup):
        for e in live:
            _step(*[e["_run"][0], data, e["_run"][1], e["_run"][2]])
    times = {e["name"]: [] for e in live}
    cpu_times = {e["name"]: [] for e in live}
    for r in range(args.rounds):
        order = live if r % 2 == 0 else live[::-1]  # alternate the order: no position bias
        for e in order:
            fn, model, opt = e["_run"]
            c0, t0 = time.process_time(), time.perf_counter()
            _step(fn, data, model, opt)
            times[e["name"]].append(time.perf_counter() - t0)
            cpu_times[e["name"]].append(time.process_time() - c0)
    if not args.no_peak and not args.peak_subprocess:
        # Peak of one step, in this process: RSS right before the step is the baseline, the
        # peak-RSS counter is reset, one step runs.  Other configurations' state is in the
        # baseline and untouched by the step.
        for e in live:
            fn, model, opt = e["_run"]
            opt.zero_grad(set_to_none=True)
            gc.collect()
            base = common.vm("VmRSS")
            common.reset_peak_rss()
            _step(fn, data, model, opt)
            e["peak_step_bytes"] = common.vm("VmHWM") - base
            e["peak_method"] = "in-process: VmHWM during one step minus VmRSS before it"
    for e in live:
        if not times[e["name"]]:  # --rounds 0: not timed
            e["step_s_median"] = e["step_ratio_vs_inductor"] = e["compile_s"] = None
            del e["_run"]
            continue
        e.update(clock_figures("step", times[e["name"]], times.get("inductor")))
        e.update(clock_figures("cpu", cpu_times[e["name"]], cpu_times.get("inductor")))
        e["compile_s"] = e["first_step_s"] - e["step_s_median"] if e["config"]["kind"] != "eager" else 0.0
        del e["_run"]
    gc.collect()

    cap = args.cap_gib * 2**30
    ind = next((e for e in entries if e["name"] == "inductor" and e.get("saved_bytes")), None)
    eag = next((e for e in entries if e["name"] == "eager" and e.get("saved_bytes")), None)
    for e in entries:
        if e.get("saved_bytes"):
            e["max_batch_under_cap"] = int(cap // (e["saved_bytes"] / args.batch))
            if ind:
                e["saved_vs_inductor"] = e["saved_bytes"] / ind["saved_bytes"]
            if eag:
                e["saved_vs_eager"] = e["saved_bytes"] / eag["saved_bytes"]
        if ind and ind.get("backward_flops") and e.get("backward_flops") is not None:
            e["backward_flops_vs_inductor"] = e["backward_flops"] / ind["backward_flops"]

    if not args.no_peak and args.peak_subprocess:
        for e in entries:
            c = e["config"]
            if args.peak_skip_modes and c["kind"] == "wtacrs" and not c["name"].startswith("wtacrs default"):
                continue
            e.update(peak_in_subprocess(args, e["name"]))
            print(f"  {e['name']:<28} peak step {e.get('peak_step_bytes', 0) / 2**20:8.1f} MiB "
                  f"{e.get('peak_error', '')}", flush=True)

    out = {
        "benchmark": "memory_time",
        "command": "python benchmarks/memory_time.py " + " ".join(sys.argv[1:]),
        "machine": common.machine(),
        "model": {
            "name": args.model, "description": desc, "batch": args.batch, "seq": args.seq,
            "layers_reduced_to": args.layers, "parameters": n_params,
        },
        "settings": {"rounds": args.rounds, "warmup": args.warmup, "cap_gib": args.cap_gib,
                     "threads": torch.get_num_threads(),
                     "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default (dynamic)"),
                     "optimizer": "SGD lr=1e-4", "peak_method": ("CPU: VmHWM during one step minus VmRSS right before it, glibc MALLOC_MMAP_THRESHOLD_=131072, "
                                       + ("each configuration in a fresh subprocess" if args.peak_subprocess else "all configurations in this process"))},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": entries,
    }
    stem = Path(args.out) if args.out else RESULTS / f"memory_time-{args.model}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(str(stem) + ".json").write_text(json.dumps(out, indent=1, default=str))
    cols = ["name", "status", "saved_bytes", "saved_vs_inductor", "saved_vs_eager", "peak_step_bytes",
            "step_s_median", "step_ratio_vs_inductor", "cpu_s_median", "cpu_ratio_vs_inductor", "compile_s", "max_batch_under_cap",
            "forward_flops", "backward_flops", "backward_flops_vs_inductor",
            "graphs", "ops", "ops_memory", "ops_compute", "ops_exact", "error"]
    with open(str(stem) + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "batch", "seq", "device"] + cols)
        for e in entries:
            w.writerow([args.model, args.batch, args.seq, out["machine"]["device"]] + [e.get(c, "") for c in cols])
    print(f"wrote {stem}.json and .csv")
    for e in entries:
        print(f"  {e['name']:<28} saved {e.get('saved_bytes', 0) / 2**20:8.1f} MiB "
              f"x{e.get('saved_vs_inductor', float('nan')):.2f} vs inductor  step x{e.get('step_ratio_vs_inductor') or float('nan'):.2f}"
              f" (CPU time x{e.get('cpu_ratio_vs_inductor') or float('nan'):.2f})"
              f"  bw FLOPs x{e.get('backward_flops_vs_inductor') or float('nan'):.2f}"
              f"  compile {e.get('compile_s') or float('nan'):6.1f} s  peak {e.get('peak_step_bytes', 0) / 2**20:8.1f} MiB  {e['status']}")


def peak_in_subprocess(args, name: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--batch", str(args.batch),
           "--seq", str(args.seq), "--peak-config", name]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("PEAK "):
            return json.loads(line[5:])
    return {"peak_error": f"subprocess rc={proc.returncode}: {proc.stderr[-800:]}"}


def peak_subprocess(args) -> None:
    import torch

    import common

    common.raise_recompile_limits()
    cfg = next(c for c in common.configurations(modes=True) if c["name"] == args.peak_config)
    model, data, _ = common.build_model(args.model, args.batch, args.seq, args.layers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    setup_rss = common.vm("VmRSS")
    fn, _ = common.compile_config(model, cfg)
    cuda = torch.cuda.is_available()
    for _ in range(2):
        _step(fn, data, model, opt)
    opt.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    base = common.vm("VmRSS")
    common.reset_peak_rss()
    _step(fn, data, model, opt)
    peak = common.vm("VmHWM")
    res = {"peak_step_bytes": peak - base, "rss_before_step": base, "rss_after_setup": setup_rss}
    if cuda:
        torch.cuda.synchronize()
        res["cuda_peak_step_bytes"] = torch.cuda.max_memory_allocated() - before
    print("PEAK " + json.dumps(res))


if __name__ == "__main__":
    main()
