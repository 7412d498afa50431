"""What DP costs in local training on this machine, measured in one run against its own baselines.

Usage: python scripts/bench_dp.py [--data DIR] [--platform kids_family] [--steps 8]
       [--config simulations/ml100k_default.toml] [--noise-multiplier 1.0]
       [--backbone default] [--max-contention 0.1] [--retries 2] [--memory-runs 3]

Real ML-100K data (prepared into a temporary folder unless ``--data`` is given), the default
backbone, trained through ``client.dp_training.LocalTrainer`` with the model, train and DP
settings of ``--config``, every step through the adapters (the costly kind of step), DP-SGD at
a fixed σ (so noise calibration is not timed):

1. DP vs non-DP (default path): median time per optimiser step and peak memory, as ratios next
   to the targets (<= 1.10x time, <= 1.2x memory). Same steps, the same expected batch (fixed
   batches for non-DP, Poisson with the same expectation for DP) and physical batch. One
   process' peak RSS varies by up to about 15 % from run to run of one configuration, so both
   sides run ``--memory-runs`` times and the memory ratios are of medians.
2. Samples/s of each configuration as a share of the fp32 matmul rate measured in this run,
   with FLOPs counted by torch's FlopCounterMode on one step (per-sample gradient work included).
3. Bytes a client uploads per round (LoRA + head) against the float32 bytes of the whole scorer.

Each configuration runs in its own subprocess (this script with ``--worker``), so its peak
memory (ru_maxrss on CPU, max_memory_allocated on CUDA) belongs to that configuration alone.
The CPU time other processes used meanwhile is measured too: on a shared machine a
configuration they competed with is rerun (``--retries``), the least contended run is kept,
and every figure is printed with the contention it was measured under.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.flop_counter import FlopCounterMode

from client.dp_training import LocalTrainer
from common.backbone import load_backbone
from common.config import RunConfig, load_config, with_settings
from common.config_sections import DEFAULT_BACKBONE
from common.dataset_summary import markdown_table
from common.featurizer import TextFeaturizer
from common.model import build_scorer, count_parameters
from common.movielens import build_ml100k
from common.platform_data import read_platform
from common.platform_writer import write_dataset
from common.scorers import Scorer
from common.task import build_task, training_units
from common.training import resolve_device
from common.wire_log import model_record

OFF = "off"  # the worker's clipping value for the non-DP baseline
NON_DP = OFF
DP_DEFAULT = "auto"  # the clipping each worker runs: off (the baseline) or DP's own choice
CONFIGS = (NON_DP, DP_DEFAULT)
TIME_TARGET = 1.10
MEMORY_TARGET = 1.2
UPLOAD_TARGET_PERCENT = 0.35


class StepMeter:
    """Wall-clock end and example count of every optimiser step inside ``LocalTrainer.run``.

    A global optimiser post-hook fires once per logical batch in both modes: Opacus'
    DPOptimizer does not patch its own ``step``, only the AdamW it wraps runs the hook, and
    that AdamW steps only after the last physical chunk of a logical batch.
    """

    def __init__(self, scorer: Scorer, device: torch.device) -> None:
        self.scorer = scorer
        self.device = device
        self.examples = 0
        self.marks: list[tuple[float, int]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> StepMeter:
        self.marks = [(time.perf_counter(), self.examples)]
        self._handles = [
            self.scorer.register_forward_pre_hook(self._count, with_kwargs=True),
            register_optimizer_step_post_hook(self._mark),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Training units in this forward (the item tower's ``item_rows`` has one row per
        unit; its candidate rows may be W times as many)."""
        rows = kwargs.get("item_rows", next(iter(kwargs.values())))
        self.examples += rows.shape[0]

    def _mark(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append((time.perf_counter(), self.examples))

    def steps(self) -> list[tuple[float, int]]:
        """(seconds, examples) of each step; the first includes Opacus' set-up."""
        return [(t1 - t0, n1 - n0) for (t0, n0), (t1, n1) in pairwise(self.marks)]


def peak_memory_mib(device: torch.device) -> float:
    """Peak so far: CUDA memory allocated by torch, or the process' peak RSS (KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def settings(args: argparse.Namespace) -> RunConfig:
    """The run configuration a worker trains with. Every timed step goes through the adapters:
    the default runs them on every train.adapter_every-th step only, and the head-only steps
    between (no encoder pass, about 0.03 s) would make a median or a FLOP rate of mixed steps
    meaningless."""
    config = load_config(args.config)
    return with_settings(config, model={"backbone": args.backbone}, train={"adapter_every": 1})


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train one configuration: timed steps after 1 warm-up, then one FLOP-counted step."""
    clipping = args.worker
    torch.manual_seed(0)
    config = settings(args)
    steps = args.steps
    device = resolve_device(config.train.device)
    sigma = None if clipping == OFF else args.noise_multiplier
    data = read_platform(Path(args.data) / args.platform)
    task = build_task(data, config.task)
    backbone, tokenizer = load_backbone(args.backbone)
    scorer = build_scorer(backbone, config.model, config.lora).to(device)
    featurizer = TextFeaturizer(tokenizer, data.item_text, config.model.max_length)
    scorer.prepare(featurizer)  # the item tower's one-off cache is set-up, not a step
    units = training_units(task.train, config.objective)  # the DP unit of this objective
    trainer = LocalTrainer(scorer, featurizer, units, config.train, config.dp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loaded = peak_memory_mib(device)

    with StepMeter(scorer, device) as meter:
        trainer.run(steps + 1, config.train.learning_rate, sigma)
    peak = peak_memory_mib(device)
    timed = meter.steps()
    if len(timed) != steps + 1:
        raise RuntimeError(f"expected {steps + 1} optimiser steps, hooked {len(timed)}")

    with StepMeter(scorer, device) as meter, FlopCounterMode(display=False) as counter:
        trainer.run(1, config.train.learning_rate, sigma)
    sizes = model_record(scorer, config.federation.strategy)
    return {
        "scorer": config.model.scorer,
        "expected_batch": config.dp.expected_batch_size,
        "physical_batch": config.train.batch_size,
        "adapter_every": config.train.adapter_every,
        "max_length": config.model.max_length,
        "clipping": OFF if sigma is None else "hooks",
        "device": device.type,
        "train_examples": len(units),
        "parameters": count_parameters(scorer),
        # what the strategy sends per round (private parts stay home) and the whole model
        "upload_bytes": sizes["shared_bytes"],
        "model_bytes": sizes["adapter_bytes"] + sizes["backbone_bytes"],
        "step_seconds": [seconds for seconds, _ in timed[1:]],
        "step_examples": [examples for _, examples in timed[1:]],
        "flops": counter.get_total_flops(),
        "flop_examples": meter.examples,
        "loaded_mib": loaded,
        "peak_mib": peak,
    }


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (Linux ``/proc/stat``).

    Against the worker's own CPU time this shows how much other processes competed with a
    configuration: torch runs one thread per core, so a busy neighbour stalls every parallel op.
    """
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_worker(args: argparse.Namespace, data: Path, clipping: str) -> dict[str, Any]:
    """This script in a fresh process for one configuration; its stderr is shown on failure."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        *("--worker", clipping, "--data", str(data), "--platform", args.platform),
        *("--steps", str(args.steps), "--noise-multiplier", str(args.noise_multiplier)),
        *("--backbone", args.backbone, "--config", args.config),
    ]
    busy, children, start = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"worker {clipping} failed (exit {done.returncode})")
    others = (busy_cpu_seconds() - busy) - (children_cpu_seconds() - children)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["other_cores"] = max(0.0, others) / (time.perf_counter() - start)
    return result


def ceiling_gflops(device: torch.device) -> float:
    """fp32 matmul rate of the training device (2048² on CPU, 8192² on CUDA)."""
    size, repeats = (8192, 20) if device.type == "cuda" else (2048, 10)
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.mm(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def label(result: dict[str, Any]) -> str:
    mode = "non-DP" if result["clipping"] == OFF else f"DP {result['clipping']}"
    return f"{result['scorer']} {mode}"


def samples_per_second(result: dict[str, Any]) -> float:
    return result["expected_batch"] / median_step(result)


def median_step(result: dict[str, Any]) -> float:
    return statistics.median(result["step_seconds"])


def step_cell(result: dict[str, Any]) -> str:
    seconds = result["step_seconds"]
    return f"{median_step(result):.2f} ({min(seconds):.2f}–{max(seconds):.2f})"


def increment(result: dict[str, Any]) -> float:
    """Memory training added to the loaded model (the median over runs, where there are several)."""
    if "added_mib_runs" in result:
        return statistics.median(result["added_mib_runs"])
    return result["peak_mib"] - result["loaded_mib"]


def memory_cell(value: float, runs: list[float] | None) -> str:
    """A memory figure, with the range of the runs it is the median of."""
    return f"{value:.0f}" + (
        f" ({min(runs):.0f}–{max(runs):.0f})" if runs and len(runs) > 1 else ""
    )


def verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "MISS"


def ratio_row(
    name: str, plain: float, dp: float, cells: tuple[str, str], target: float | None
) -> list[str]:
    """One metric of section 1: its two measured cells, DP / non-DP and the target if any."""
    ratio = dp / plain if plain > 0 else float("inf")
    checked = [f"<= {target:.2f}x", verdict(ratio, target)] if target else ["", ""]
    return [name, *cells, f"{ratio:.3f}x", *checked]


def dp_table(plain: dict[str, Any], dp: dict[str, Any], memory: str) -> str:
    """Section 1: DP over non-DP for step time, absolute peak memory and its training part.

    The mean examples per timed step shows that both sides processed the same expected batch.
    """
    peak = plain["peak_mib"], dp["peak_mib"]
    extra = increment(plain), increment(dp)
    examples = statistics.mean(plain["step_examples"]), statistics.mean(dp["step_examples"])
    rows = [
        ratio_row(
            "s/step median (min–max)",
            median_step(plain),
            median_step(dp),
            (step_cell(plain), step_cell(dp)),
            TIME_TARGET,
        ),
        ratio_row(
            f"peak {memory} MiB, median (min–max)",
            *peak,
            (
                memory_cell(peak[0], plain.get("peak_mib_runs")),
                memory_cell(peak[1], dp.get("peak_mib_runs")),
            ),
            MEMORY_TARGET,
        ),
        ratio_row(
            f"{memory} MiB added in training, median (min–max)",
            *extra,
            (
                memory_cell(extra[0], plain.get("added_mib_runs")),
                memory_cell(extra[1], dp.get("added_mib_runs")),
            ),
            MEMORY_TARGET,
        ),
        ratio_row(
            "examples per timed step (mean)",
            *examples,
            (f"{examples[0]:.1f}", f"{examples[1]:.1f}"),
            None,
        ),
    ]
    header = ["metric", label(plain), label(dp), "DP / non-DP", "target", "result"]
    return markdown_table(header, rows)


def flops_table(results: list[dict[str, Any]], ceiling: float) -> str:
    """Section 2: samples/s = expected batch / median step; FLOPs per example from one step."""
    rows = [["fp32 matmul (ceiling)", "", "", f"{ceiling:.1f}", "1.000"]]
    for r in results:
        per_example = r["flops"] / r["flop_examples"]
        rate = samples_per_second(r)
        achieved = per_example * rate / 1e9
        rows.append(
            [
                label(r),
                f"{rate:.1f}",
                f"{per_example / 1e9:.3f}",
                f"{achieved:.1f}",
                f"{achieved / ceiling:.3f}",
            ]
        )
    header = ["configuration", "samples/s", "GFLOP/sample", "achieved GFLOP/s", "ratio to matmul"]
    return markdown_table(header, rows)


def upload_table(results: list[dict[str, Any]]) -> str:
    """Section 3: what a client sends per round (LoRA + head) against the whole scorer."""
    rows = []
    for r in results:
        percent = 100 * r["upload_bytes"] / r["model_bytes"]
        rows.append(
            [
                r["scorer"],
                f"{r['upload_bytes']:,}",
                f"{r['model_bytes']:,}",
                f"{percent:.3f} %",
                f"<= {UPLOAD_TARGET_PERCENT} %",
                verdict(percent, UPLOAD_TARGET_PERCENT),
            ]
        )
    header = ["scorer", "upload B/round", "full model B (fp32)", "share", "target", "result"]
    return markdown_table(header, rows)


def measure_memory(args: argparse.Namespace, data: Path, spec: str, tag: str) -> dict[str, Any]:
    """One configuration of section 1 run ``--memory-runs`` times: the least contended run's
    step times, and each memory figure as the median of the runs (every run's kept too)."""
    runs = [
        measure(args, data, spec, f"{tag} run {n}/{args.memory_runs}")
        for n in range(1, args.memory_runs + 1)
    ]
    peaks = [r["peak_mib"] for r in runs]
    return min(runs, key=lambda r: r["other_cores"]) | {
        "peak_mib": statistics.median(peaks),
        "peak_mib_runs": peaks,
        "added_mib_runs": [increment(r) for r in runs],
    }


def measure(args: argparse.Namespace, data: Path, spec: str, tag: str) -> dict[str, Any]:
    """One configuration, run again (up to ``--retries`` times) while other processes competed.

    The attempt with the least foreign CPU load is kept; its load is reported with the results.
    """
    attempts: list[dict[str, Any]] = []
    while len(attempts) <= args.retries:
        start = time.perf_counter()
        result = run_worker(args, data, spec)
        attempts.append(result)
        retry = f" attempt {len(attempts)}" if len(attempts) > 1 else ""
        print(
            f"[{tag}{retry}] {label(result)}: {step_cell(result)} s/step, "
            f"peak {result['peak_mib']:.0f} MiB (+{increment(result):.0f} MiB in training), "
            f"other processes {result['other_cores']:.2f} cores, "
            f"{time.perf_counter() - start:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        if result["other_cores"] <= args.max_contention:
            break
    return min(attempts, key=lambda r: r["other_cores"]) | {"attempts": len(attempts)}


def report(args: argparse.Namespace, data: Path) -> None:
    """Run every configuration in its own process, then print the header and four tables."""
    config = RunConfig()
    device = resolve_device(config.train.device)
    ceiling = ceiling_gflops(device)
    print(f"fp32 matmul: {ceiling:.1f} GFLOP/s", file=sys.stderr, flush=True)
    results = {
        spec: measure_memory(args, data, spec, f"{n}/{len(CONFIGS)}")
        for n, spec in enumerate(CONFIGS, 1)
    }
    # A ceiling is a maximum: the better of two measurements discounts a moment of contention.
    ceiling = max(ceiling, ceiling_gflops(device))
    memory = "CUDA allocated" if device.type == "cuda" else "RSS"
    plain = results[NON_DP]
    name = "all-MiniLM-L6-v2 (default)" if args.backbone == DEFAULT_BACKBONE else args.backbone
    print(
        f"backbone {name}, {plain['parameters'] / 1e6:.1f} M parameters, on "
        f"{device.type}, {torch.get_num_threads()} threads; platform {args.platform} "
        f"({plain['train_examples']:,} train examples); default path from {args.config}: "
        f"expected batch {plain['expected_batch']} (DP: Poisson, non-DP: fixed), physical "
        f"batch {plain['physical_batch']}; σ = {args.noise_multiplier:g}; median of "
        f"{args.steps} steps after 1 warm-up"
    )
    contention = ", ".join(
        f"{label(r)} {r['other_cores']:.2f}"
        + (f" (least of {r['attempts']} runs)" if r["attempts"] > 1 else "")
        for r in results.values()
    )
    print(f"CPU cores busy with other processes meanwhile: {contention}\n")
    print("### 1. DP vs non-DP local training\n")
    print(dp_table(plain, results[DP_DEFAULT], memory) + "\n")
    print("### 2. Training throughput against the matmul ceiling\n")
    print(flops_table([results[DP_DEFAULT], plain], ceiling) + "\n")
    print("### 3. Upload per round vs full model\n")
    print(upload_table([plain]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="prepared ML-100K folder (built in a temp dir if absent)")
    parser.add_argument("--platform", default="kids_family")
    parser.add_argument("--steps", type=int, default=8, help="timed steps after 1 warm-up")
    parser.add_argument("--config", default="simulations/ml100k_default.toml")
    parser.add_argument("--noise-multiplier", type=float, default=1.0, help="fixed DP σ")
    parser.add_argument("--backbone", default=RunConfig().model.backbone)
    parser.add_argument(
        "--max-contention",
        type=float,
        default=0.1,
        help="CPU cores other processes may use during a configuration before it is rerun",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="reruns of a contended configuration"
    )
    parser.add_argument(
        "--memory-runs", type=int, default=3, help="runs of each side of the DP memory ratios"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # CLIPPING -> JSON
    args = parser.parse_args()
    if args.steps < 1 or args.memory_runs < 1:
        parser.error("--steps and --memory-runs must be at least 1")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    start = time.perf_counter()
    if args.data:
        report(args, Path(args.data))
    else:
        tables = [t for t in build_ml100k() if t.name == args.platform]
        if not tables:
            parser.error(f"--platform {args.platform!r} is not an ML-100K platform")
        with tempfile.TemporaryDirectory() as folder:
            report(args, write_dataset(Path(folder) / "ml100k", tables))
    print(f"done in {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
