#!/usr/bin/env python
"""Does MoGE's advantage over MoE grow with the number of experts? Runs and reports that study with
`compare_moe_moge.py`.

For each number of experts E (the expert size stays fixed, so active FLOPs do too), a *study* (one task and top-k)
runs three phases, each job one `compare_moe_moge.py` process:

1. **MoE probes**: the MoE baseline (lambda = 0) at each `--moe_aux_coefs` (its own knob, the Switch load-balancing
   weight), seed `--probe_seed`, validation only. The best validation metric picks the baseline's coefficient.
2. **MoGE probes**: the MoGE arm (`--padding`) at each `--moge_loss_coefs` on top of that baseline (same seed,
   validation only). The best picks lambda. Both methods get the same number of probes.
3. **Finals**: the chosen MoE and MoGE settings at each `--final_seeds` (seeds the probes did not use), with the test
   split, which nothing was chosen on; one job per arm and seed, then merged into `e<E>/final/results.json`, whose
   `paired` section holds MoGE - MoE seed by seed with the 95% t-interval.

Jobs run `--workers` at a time, each with one thread (`OMP_NUM_THREADS=1`, the CPU presets' `torch_threads=1`). Each
job writes `results.json`, `log.txt` and `job.json` (command, wall seconds) into its own folder; a finished job is
never run again, so a stopped study (Ctrl-C or `kill`, which stop its running jobs too) resumes where it stopped
when the same command runs again. Arguments after `--` go to every job (data files, steps, setup).

`--archive STUDY_DIR --output_dir DEST` copies a study's records, results gzipped, for keeping in git (docs/results/).
`--report STUDY_DIR [...]` trains nothing: it reads the finished settings of one or more studies and writes
`gap.json` (choices, probes, per-arm diagnostics, paired differences with 95% t-intervals, wall times, and per
study the trend: the slope of the paired difference per doubling of E, with its 95% t-interval) and
`gap_vs_experts.png` (MoGE - MoE on the test metric against E, one panel per task) and
`routing_entropy_vs_step.png` (do the routers leave uniform?) into `--output_dir`.

Examples:

```bash
python scripts/gap_vs_experts.py --task vision --num_experts 8 32 128 --num_experts_per_tok 1 \
    --output_dir runs/gap/vision_k1 -- --train_file path/to/cifar10/train.parquet \
    --test_file path/to/cifar10/test.parquet --max_steps 3000 --warmup_steps 150 --eval_every 500
python scripts/gap_vs_experts.py --archive runs/gap/vision_k1 --output_dir docs/results/gap/vision_k1
python scripts/gap_vs_experts.py --report docs/results/gap/vision_k1 --output_dir docs/figures/gap
```
"""

import argparse
import fcntl
import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_moe_moge as compare  # noqa: E402


SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare_moe_moge.py")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else list(argv)
    passthrough = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("vision", "language"), help="Task of the study (not with --report).")
    parser.add_argument("--num_experts", type=int, nargs="+", help="The numbers of experts E to compare.")
    parser.add_argument("--num_experts_per_tok", type=int, help="Top-k of every setting.")
    parser.add_argument("--moe_aux_coefs", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    parser.add_argument("--moge_loss_coefs", type=float, nargs="+", help="Lambdas probed (default: by task).")
    parser.add_argument("--padding", default="circular", help="Padding of the MoGE arm's map.")
    parser.add_argument("--probe_seed", type=int, default=0)
    parser.add_argument("--final_seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--workers", type=int, default=2, help="Jobs at a time, one thread each.")
    parser.add_argument("--output_dir", required=True, help="The study's folder (or the report's, with --report).")
    parser.add_argument("--report", nargs="+", metavar="STUDY_DIR", help="Report finished studies; train nothing.")
    parser.add_argument(
        "--archive",
        metavar="STUDY_DIR",
        help="Copy a study's records (settings, choices, job times, results.json gzipped, the finals' PNGs) into "
        "--output_dir, small enough to keep in git; --report reads the copy.",
    )
    args = parser.parse_args(argv)
    if not args.report and not args.archive:
        missing = [name for name in ("task", "num_experts", "num_experts_per_tok") if getattr(args, name) is None]
        if missing:
            parser.error(f"a study needs --{', --'.join(missing)}")
        if args.moge_loss_coefs is None:
            # The paper's lambda (ViT 0.003, LM 1e-5) adds next to nothing at this scale (docs/RESULTS.md), so the
            # probes span it and two decades above.
            args.moge_loss_coefs = [0.003, 0.03, 0.3] if args.task == "vision" else [1e-4, 1e-3, 1e-2]
        if set(args.final_seeds) & {args.probe_seed}:
            parser.error("--final_seeds must not include --probe_seed: the probes chose the settings on that seed")
        if any(c <= 0 for c in args.moge_loss_coefs) or any(c < 0 for c in args.moe_aux_coefs):
            parser.error("--moge_loss_coefs must be > 0 and --moe_aux_coefs >= 0")
        if len(args.moge_loss_coefs) != len(args.moe_aux_coefs):
            parser.error("--moe_aux_coefs and --moge_loss_coefs must be as many: both methods get the same probes")
        for name in ("num_experts", "final_seeds", "moe_aux_coefs", "moge_loss_coefs"):
            values = getattr(args, name)
            if len({f"{value:g}" for value in values}) != len(values):  # `:g` names the probes' folders
                parser.error(f"--{name} has repeated values: {values}")
        if args.workers < 1:
            parser.error("--workers must be >= 1")
        taken = sorted(
            flag for flag in CONTROLLED for item in passthrough if item == flag or item.startswith(flag + "=")
        )
        if taken:
            parser.error(f"the study sets {taken} itself for each job; leave them out of the arguments after --")
    return args, passthrough


# What the study sets for each job: the same flag after `--` would silently win over it.
CONTROLLED = (
    "--task", "--scale", "--seeds", "--paddings", "--num_experts", "--num_experts_per_tok", "--router_aux_loss_coef",
    "--moge_loss_coefs", "--include_moe", "--include_moge", "--do_test", "--output_dir", "--merge_from", "--plot_from",
)  # fmt: skip


_LOADED: dict[str, tuple[float, dict]] = {}


def finished(job_dir: str) -> dict | None:
    """The results of a finished `compare_moe_moge.py` job (its final write has the table), else None.

    Reads `results.json`, or `results.json.gz` (the archived copies in docs/)."""
    path = os.path.join(job_dir, "results.json")
    if not os.path.exists(path):
        path += ".gz"
        if not os.path.exists(path):
            return None
    mtime = os.path.getmtime(path)
    if path not in _LOADED or _LOADED[path][0] != mtime:  # read each version of a file once
        try:
            with (gzip.open if path.endswith(".gz") else open)(path, "rt") as handle:
                _LOADED[path] = (mtime, json.load(handle))
        except (ValueError, EOFError, OSError):  # being written by an older compare_moe_moge.py: not finished
            return None
    results = _LOADED[path][1]
    return results if "table_markdown" in results else None


def validation_metric(results: dict) -> tuple[float, bool]:
    """The job's single run's validation metric and whether higher is better."""
    study = compare.StudyArguments(**{**results["study"], "plot_from": None, "merge_from": None})
    name, higher = compare.primary_metric(study)
    (run,) = results["runs"]
    return run["validation"][name], higher


def best(candidates: list[tuple[float, dict]]) -> tuple[float, list[dict]]:
    """The coefficient whose finished probe has the best validation metric (the first one on a tie; a diverged,
    non-finite one never)."""
    table = []
    for coef, results in candidates:
        value, higher = validation_metric(results)
        table.append({"coef": coef, "validation": value})
    finite = [row for row in table if math.isfinite(row["validation"])]
    if not finite:
        raise ValueError(f"every probe diverged (non-finite validation metric): {table}")
    sign = 1 if higher else -1
    chosen = max(finite, key=lambda row: sign * row["validation"])  # max keeps the first of equals
    return chosen["coef"], table


class Setting:
    """One number of experts of a study: its jobs, in the order of the phases."""

    def __init__(self, args: argparse.Namespace, passthrough: list[str], num_experts: int):
        self.args, self.passthrough, self.num_experts = args, passthrough, num_experts
        self.dir = os.path.join(args.output_dir, f"e{num_experts}")

    def base(self, seed: int, aux: float) -> list[str]:
        task = ["--task", self.args.task, "--scale", "cpu", "--seeds", str(seed), "--paddings", self.args.padding]
        experts = ["--num_experts", str(self.num_experts), "--num_experts_per_tok", str(self.args.num_experts_per_tok)]
        return [*task, *experts, "--router_aux_loss_coef", repr(aux), *self.passthrough]

    def moe_probes(self) -> dict[str, tuple[float, list[str]]]:
        """Job name -> (aux coefficient, arguments)."""
        seed = self.args.probe_seed
        return {
            f"probe_moe_aux{aux:g}": (aux, [*self.base(seed, aux), "--include_moge", "False"])
            for aux in self.args.moe_aux_coefs
        }

    def moge_probes(self, aux: float) -> dict[str, tuple[float, list[str]]]:
        """Job name -> (lambda, arguments), on top of the baseline with aux coefficient `aux`."""
        extra = ["--include_moe", "False", "--moge_loss_coefs"]
        seed = self.args.probe_seed
        return {
            f"probe_moge_l{coef:g}": (coef, [*self.base(seed, aux), *extra, repr(coef)])
            for coef in self.args.moge_loss_coefs
        }

    def finals(self, aux: float, coef: float) -> dict[str, list[str]]:
        jobs = {}
        for seed in self.args.final_seeds:
            common = [*self.base(seed, aux), "--moge_loss_coefs", repr(coef), "--do_test"]
            jobs[f"final_moe_seed{seed}"] = [*common, "--include_moge", "False"]
            jobs[f"final_moge_seed{seed}"] = [*common, "--include_moe", "False"]
        return jobs

    def final_names(self) -> list[str]:
        return [f"final_{arm}_seed{seed}" for seed in self.args.final_seeds for arm in ("moe", "moge")]

    def selection(self) -> dict:
        """What the probes chose so far: `aux`, `moge_loss_coef` (None until their probes have all finished)."""
        chosen = {"num_experts": self.num_experts, "aux": None, "moge_loss_coef": None}
        probes = self.moe_probes()
        done = [(coef, finished(os.path.join(self.dir, name))) for name, (coef, _) in probes.items()]
        if not all(results for _, results in done):
            return chosen
        chosen["aux"], chosen["moe_probes"] = best(done)
        probes = self.moge_probes(chosen["aux"])
        done = [(coef, finished(os.path.join(self.dir, name))) for name, (coef, _) in probes.items()]
        for name, (_, results) in zip(probes, done):
            if results and results["model"]["router_aux_loss_coef"] != chosen["aux"]:
                raise ValueError(
                    f"{os.path.join(self.dir, name)} was trained on a baseline with aux coefficient "
                    f"{results['model']['router_aux_loss_coef']}, but the MoE probes now choose {chosen['aux']}; "
                    "remove that folder to rerun it"
                )
        if all(results for _, results in done):
            chosen["moge_loss_coef"], chosen["moge_probes"] = best(done)
        return chosen

    def pending(self) -> dict[str, list[str]]:
        """The jobs that can run now (their inputs are chosen) and have not finished."""
        chosen = self.selection()
        if chosen["aux"] is None:
            jobs = {name: command for name, (_, command) in self.moe_probes().items()}
        elif chosen["moge_loss_coef"] is None:
            jobs = {name: command for name, (_, command) in self.moge_probes(chosen["aux"]).items()}
        else:
            jobs = self.finals(chosen["aux"], chosen["moge_loss_coef"])
        return {name: command for name, command in jobs.items() if not finished(os.path.join(self.dir, name))}

    def merge(self) -> bool:
        """Merge the finished finals into `final/results.json` (once); whether the setting is complete."""
        chosen = self.selection()
        if chosen["moge_loss_coef"] is None or self.pending():
            return False
        final = os.path.join(self.dir, "final")
        if not finished(final):
            files = [os.path.join(self.dir, name, "results.json") for name in self.final_names()]
            compare.main(["--merge_from", *files, "--output_dir", final])
        with open(os.path.join(self.dir, "selection.json"), "w") as handle:
            json.dump(chosen, handle, indent=1)
        return True


def launch(setting: Setting, name: str, command: list[str]) -> tuple[subprocess.Popen, dict]:
    job_dir = os.path.join(setting.dir, name)
    os.makedirs(job_dir, exist_ok=True)
    full = [sys.executable, SCRIPT, *command, "--output_dir", job_dir]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = open(os.path.join(job_dir, "log.txt"), "w")
    process = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    record = {"job": name, "dir": job_dir, "command": full[1:], "start": time.time()}
    print(f"[{time.strftime('%H:%M:%S')}] start {job_dir}", flush=True)
    return process, record


def run_study(args: argparse.Namespace, passthrough: list[str]) -> None:
    os.makedirs(args.output_dir, exist_ok=True)
    lock = open(os.path.join(args.output_dir, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RuntimeError(f"another gap_vs_experts.py is running the study in {args.output_dir}") from None
    # `kill` (SIGTERM) stops the study like Ctrl-C: its running jobs are stopped too (background jobs of a script
    # ignore SIGINT, so SIGTERM is how one stops them).
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        _run_study(args, passthrough)
    finally:
        signal.signal(signal.SIGTERM, previous)
        lock.close()


def _run_study(args: argparse.Namespace, passthrough: list[str]) -> None:
    spec = {key: value for key, value in vars(args).items() if key not in ("workers", "report", "output_dir")}
    spec["passthrough"] = passthrough
    spec_path = os.path.join(args.output_dir, "study.json")
    if os.path.exists(spec_path):
        with open(spec_path) as handle:
            saved = json.load(handle)
        keys = (spec.keys() | saved.keys()) - {"num_experts"}
        differ = sorted(key for key in keys if spec.get(key) != saved.get(key))
        if differ:
            raise ValueError(
                f"{args.output_dir} holds a study with other settings ({differ} differ, see {spec_path}); run the "
                "same command to resume it, or use another --output_dir"
            )
        spec["num_experts"] = list(dict.fromkeys([*saved["num_experts"], *spec["num_experts"]]))  # E may be added
    with open(spec_path, "w") as handle:
        json.dump(spec, handle, indent=1)

    settings = [Setting(args, passthrough, e) for e in args.num_experts]
    running: dict[str, tuple[subprocess.Popen, dict]] = {}
    try:
        schedule(args, settings, running)
    finally:
        for process, record in running.values():  # an error or Ctrl-C in the driver: stop its jobs too
            process.terminate()
            print(f"stopped {record['dir']}", flush=True)
    complete = [setting.num_experts for setting in settings if setting.merge()]
    print(f"complete: E = {complete}; report with: python {sys.argv[0]} --report {args.output_dir} --output_dir ...")


def schedule(args: argparse.Namespace, settings: list[Setting], running: dict) -> None:
    """Launch the jobs that can run, `args.workers` at a time, until none is left; after a failure, launch no more,
    wait for the running ones and raise. `running` (job folder -> (process, record)) is the caller's, so that it can
    stop them if this is interrupted."""
    failed = []
    changed = True  # a job ended (or the first pass): look for jobs that can start
    while True:
        for key, (process, record) in list(running.items()):
            if process.poll() is None:
                continue
            del running[key]
            changed = True
            record.update(wall_seconds=time.time() - record["start"], returncode=process.returncode)
            with open(os.path.join(record["dir"], "job.json"), "w") as handle:
                json.dump(record, handle, indent=1)
            if process.returncode != 0 or not finished(record["dir"]):
                failed.append(record["dir"])
            print(f"[{time.strftime('%H:%M:%S')}] done  {record['dir']} ({record['wall_seconds']:.0f} s)", flush=True)
        if failed and not running:
            logs = ", ".join(os.path.join(path, "log.txt") for path in failed)
            raise RuntimeError(f"{len(failed)} job(s) failed; see {logs}")
        if changed and not failed:
            changed = False
            for setting in settings:
                jobs = setting.pending()
                if not jobs:
                    setting.merge()  # the setting's finals are all done
                for name, command in jobs.items():
                    key = os.path.join(setting.dir, name)
                    if key not in running and len(running) < args.workers:
                        running[key] = launch(setting, name, command)
        if not running:
            break
        time.sleep(3)


# ------------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------------

ARM_KEYS = {
    "vision": ["top1_prob", "load_entropy", "routing_entropy", "output_cosine", "mi_class_bits", "mi_class_null_bits",
               "shift_right_same", "shift_right_window", "shift_right_chance_window", "flip_same", "flip_window",
               "flip_chance_window"],
    "language": ["top1_prob", "load_entropy", "routing_entropy", "output_cosine", "mi_token_bits",
                 "mi_token_null_bits", "context_same_top1", "context_window", "context_chance_window"],
}  # fmt: skip


def wall_seconds(setting_dir: str) -> dict[str, float]:
    times = {}
    for name in sorted(os.listdir(setting_dir)):
        path = os.path.join(setting_dir, name, "job.json")
        if os.path.exists(path):
            with open(path) as handle:
                times[name] = json.load(handle)["wall_seconds"]
    return times


def report_study(study_dir: str) -> dict:
    with open(os.path.join(study_dir, "study.json")) as handle:
        spec = json.load(handle)
    args = argparse.Namespace(**{**spec, "output_dir": study_dir})
    out = {"study_dir": study_dir, "spec": spec, "settings": []}
    for num_experts in spec["num_experts"]:
        setting = Setting(args, spec["passthrough"], num_experts)
        entry = {"num_experts": num_experts, **setting.selection()}
        entry["wall_seconds"] = wall_seconds(setting.dir) if os.path.isdir(setting.dir) else {}
        results = finished(os.path.join(setting.dir, "final"))
        entry["complete"] = results is not None
        if results is not None:
            saved = compare.StudyArguments(**{**results["study"], "plot_from": None, "merge_from": None})
            metric, higher = compare.primary_metric(saved)
            paired = compare.paired_differences(saved, results["runs"])  # recomputed: older files have none
            (moge_arm,) = paired
            entry.update(metric=metric, higher_is_better=higher, moge_arm=moge_arm, paired=paired[moge_arm])
            entry["arms"] = {
                arm: {key: values[key] for key in ARM_KEYS[spec["task"]] + [f"val_{metric}", f"test_{metric}"]}
                for arm, values in results["summary"].items()
            }
            entry["hardware"] = results["runs"][0].get("hardware") or results.get("hardware")
            entry["entropy_curves"] = entropy_curves(results)
        out["settings"].append(entry)
    out["trend"] = {split: trend(out, split) for split in ("val", "test")}
    return out


def trend(study: dict, split: str) -> dict | None:
    """Does the gap grow with E? The least-squares slope of the per-seed paired differences (MoGE - MoE on `split`'s
    metric) against log2 E, over every final pair of the study's finished settings, with its 95% t-interval
    (n - 2 degrees of freedom); None with fewer than 2 values of E or 3 pairs. Pairs at different E share nothing, so
    they are treated as independent points."""
    points = [
        (math.log2(entry["num_experts"]), value)
        for entry in study["settings"]
        if entry["complete"] and f"{split}_{entry['metric']}" in entry["paired"]
        for value in entry["paired"][f"{split}_{entry['metric']}"]["differences"]
    ]
    x = np.array([point[0] for point in points], dtype=float)
    y = np.array([point[1] for point in points], dtype=float)
    if len(np.unique(x)) < 2 or len(x) < 3:
        return None
    sxx = float(np.sum((x - x.mean()) ** 2))
    slope = float(np.sum((x - x.mean()) * (y - y.mean())) / sxx)
    residuals = y - (y.mean() + slope * (x - x.mean()))
    dof = len(x) - 2
    half = compare.student_t_quantile(0.975, dof) * math.sqrt(float(np.sum(residuals**2)) / dof / sxx)
    return {"slope_per_doubling": slope, "ci95": [slope - half, slope + half], "pairs": len(x), "dof": dof}


def trend_table(studies: list[dict]) -> str:
    lines = [
        "| task | top-k | E | pairs | MoGE - MoE per doubling of E, validation [95% CI] | the same, test [95% CI] |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for study in studies:
        spec, trends = study["spec"], study["trend"]
        if trends["test"] is None and trends["val"] is None:
            continue
        done = [str(entry["num_experts"]) for entry in study["settings"] if entry["complete"]]
        pairs = (trends["test"] or trends["val"])["pairs"]
        cells = [
            fmt_interval({"mean": t["slope_per_doubling"], "ci95": t["ci95"]}) if t else "-" for t in trends.values()
        ]
        lines.append(
            f"| {spec['task']} | {spec['num_experts_per_tok']} | {', '.join(done)} | {pairs} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def fmt_interval(entry: dict | None, scale: float = 1.0) -> str:
    if entry is None:
        return "-"
    if entry["ci95"] is None:
        return f"{entry['mean'] * scale:+.4f}"
    low, high = (value * scale for value in entry["ci95"])
    return f"{entry['mean'] * scale:+.4f} [{low:+.4f}, {high:+.4f}]"


def report_table(studies: list[dict]) -> str:
    lines = [
        "| task | top-k | E | aux (MoE probes) | lambda (MoGE probes) | MoGE - MoE, validation | MoGE - MoE, test | "
        "top-1 prob MoE / MoGE (1/E) | load entropy MoE / MoGE |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for study in studies:
        spec = study["spec"]
        for entry in study["settings"]:
            head = f"| {spec['task']} | {spec['num_experts_per_tok']} | {entry['num_experts']} | {entry['aux']} | "
            head += f"{entry['moge_loss_coef']} | "
            if not entry["complete"]:
                lines.append(head + "pending | pending | - | - |")
                continue
            arms = entry["arms"]
            moe, moge = arms["moe"], arms[entry["moge_arm"]]
            uniform = 1 / entry["num_experts"]
            lines.append(
                head
                + f"{fmt_interval(entry['paired'].get('val_' + entry['metric']))} | "
                + f"{fmt_interval(entry['paired'].get('test_' + entry['metric']))} | "
                + f"{moe['top1_prob']['mean']:.3f} / {moge['top1_prob']['mean']:.3f} ({uniform:.3f}) | "
                + f"{moe['load_entropy']['mean']:.3f} / {moge['load_entropy']['mean']:.3f} |"
            )
    return "\n".join(lines)


def diagnostics_table(studies: list[dict]) -> str:
    """Per finished setting and diagnostic: each arm's mean over the final seeds and the paired MoGE - MoE."""
    lines = [
        "| task | top-k | E | diagnostic | MoE | MoGE | MoGE - MoE [95% CI] |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for study in studies:
        spec = study["spec"]
        for entry in (e for e in study["settings"] if e["complete"]):
            head = f"| {spec['task']} | {spec['num_experts_per_tok']} | {entry['num_experts']} | "
            moe, moge = entry["arms"]["moe"], entry["arms"][entry["moge_arm"]]
            for key in ARM_KEYS[spec["task"]]:
                if moe[key]["mean"] is None or moge[key]["mean"] is None:
                    continue
                paired = fmt_interval(entry["paired"].get(key))
                lines.append(head + f"{key} | {moe[key]['mean']:.4f} | {moge[key]['mean']:.4f} | {paired} |")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot as moge_hf's plots set it up, or None (with a note) when matplotlib is missing."""
    try:
        return compare.diag._pyplot()
    except ImportError as error:
        print(f"{error}: no pictures")
        return None


def plot_gap(studies: list[dict], path: str) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    tasks = list(dict.fromkeys(study["spec"]["task"] for study in studies))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for index, study in enumerate(s for s in studies if s["spec"]["task"] == task):
            done = [entry for entry in study["settings"] if entry["complete"]]
            if not done:
                continue
            metric = done[0]["metric"]
            k = study["spec"]["num_experts_per_tok"]
            shift = 1.0 + 0.06 * (index - 0.5)  # side by side on the log axis
            xs = np.array([entry["num_experts"] for entry in done], dtype=float) * shift
            paired = [entry["paired"][f"test_{metric}"] for entry in done]
            means = np.array([entry["mean"] for entry in paired])
            low = np.array([entry["mean"] - entry["ci95"][0] if entry["ci95"] else 0.0 for entry in paired])
            high = np.array([entry["ci95"][1] - entry["mean"] if entry["ci95"] else 0.0 for entry in paired])
            line = ax.errorbar(xs, means, yerr=[low, high], marker="o", capsize=4, label=f"top-{k}: mean, 95% CI")
            for x, entry in zip(xs, paired):
                ax.scatter([x] * len(entry["differences"]), entry["differences"], s=12, alpha=0.45,
                           color=line[0].get_color())  # fmt: skip
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts per MoE layer E (expert size fixed)")
        better = "higher is better" if task == "vision" else "lower is better"
        name = "test accuracy" if task == "vision" else "test loss (nats/token)"
        ax.set_ylabel(f"MoGE - MoE, {name} ({better})")
        ax.set_title(f"{task}: paired by seed (dots: seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def entropy_curves(results: dict) -> dict[str, dict]:
    """Per arm: the training routing entropy over steps (the MoGE callback's `moge/layer*/entropy`, mean over the MoE
    layers) divided by log E, mean over seeds; 1 = uniform routers."""
    curves = {}
    for run in results["runs"]:
        steps, values = [], []
        for entry in run["log_history"]:
            layers = [v for key, v in entry.items() if key.startswith("moge/layer") and key.endswith("/entropy")]
            if layers:
                steps.append(entry["step"])
                values.append(float(np.mean(layers)))
        curves.setdefault(run["arm"], []).append((steps, values))
    num_experts = len(results["runs"][0]["diagnostics"]["layers"][0]["load"])
    out = {}
    for arm, runs in curves.items():
        length = min(len(steps) for steps, _ in runs)
        mean = np.mean([values[:length] for _, values in runs], axis=0) / math.log(num_experts)
        out[arm] = {"steps": runs[0][0][:length], "entropy_over_log_e": mean.tolist()}
    return out


def plot_entropy(studies: list[dict], path: str) -> str | None:
    """Training routing entropy / log E against the step, one panel per study, a colour per E (solid MoE, dashed
    MoGE): whether the routers leave uniform."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(studies), figsize=(5 * len(studies), 3.8), squeeze=False)
    for ax, study in zip(axes[0], studies):
        spec = study["spec"]
        for index, entry in enumerate(e for e in study["settings"] if e["complete"]):
            for arm, curve in entry["entropy_curves"].items():
                style = "-" if arm == "moe" else "--"
                label = f"E={entry['num_experts']} {'MoE' if arm == 'moe' else 'MoGE'}"
                ax.plot(curve["steps"], curve["entropy_over_log_e"], style, color=f"C{index}", label=label)
        ax.set_title(f"{spec['task']}, top-{spec['num_experts_per_tok']}: finals, mean over seeds")
        ax.set_xlabel("training step")
        ax.set_ylabel("routing entropy / log E (1 = uniform)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(args: argparse.Namespace) -> dict:
    studies = [report_study(path) for path in args.report]
    os.makedirs(args.output_dir, exist_ok=True)
    table = report_table(studies)
    out = {"studies": studies, "table_markdown": table, "diagnostics_markdown": diagnostics_table(studies)}
    out["trend_markdown"] = trend_table(studies)
    out["figures"] = [
        plot_gap(studies, os.path.join(args.output_dir, "gap_vs_experts.png")),
        plot_entropy(studies, os.path.join(args.output_dir, "routing_entropy_vs_step.png")),
    ]
    with open(os.path.join(args.output_dir, "gap.json"), "w") as handle:
        json.dump(out, handle, indent=1)
    print(table, out["trend_markdown"], out["diagnostics_markdown"], sep="\n\n")
    return out


def archive(study_dir: str, destination: str) -> list[str]:
    """Copy what `--report` reads (and the job times and finals' pictures) from `study_dir` into `destination`."""
    written = []
    skip = os.path.abspath(destination)
    for folder, subfolders, names in os.walk(study_dir):
        subfolders[:] = [name for name in subfolders if os.path.abspath(os.path.join(folder, name)) != skip]
        relative = os.path.relpath(folder, study_dir)
        depth = 0 if relative == "." else relative.count(os.sep) + 1
        for name in names:
            # study.json, e<E>/selection.json, e<E>/<job>/{job.json, results.json[.gz]}; the merged finals' PNGs
            keep = name.endswith((".json", ".json.gz")) and depth <= 2
            keep |= name.endswith(".png") and os.path.basename(folder) == "final" and depth == 2
            if not keep or (name.startswith("results.json") and finished(folder) is None):  # a job still running
                continue
            target = os.path.join(destination, relative, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(os.path.join(folder, name), "rb") as handle:
                data = handle.read()
            if name == "results.json":
                target += ".gz"
                data = gzip.compress(data, compresslevel=9, mtime=0)
            with open(target, "wb") as handle:
                handle.write(data)
            written.append(target)
    print(f"archived {len(written)} files of {study_dir} into {destination}")
    return written


def main(argv: list[str] | None = None):
    args, passthrough = parse_args(argv)
    if args.archive:
        return archive(args.archive, args.output_dir)
    if args.report:
        return report(args)
    return run_study(args, passthrough)


if __name__ == "__main__":
    main()
