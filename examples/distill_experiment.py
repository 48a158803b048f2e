"""The bert-kd experiment of docs/distill.md ("Experiment"), offline, on the CPU.

On ``builtin:sharegpt-match`` (2,000 train / 500 test ShareGPT question/answer pairs):

1. T6: all-MiniLM-L6-v2 (``bundled:minilm``) fine-tuned as a classifier (bert-kd fine-tunes a
   teacher without a head first; its ``teacher_finetune/model`` is reused by every later run);
2. T3: T6's embeddings, layers [2, 4, 6], pooler and head (``student.init: teacher_layers``),
   trained with CE alone (a bert-kd run with every KD weight 0); both teachers train ``--teacher-epochs``;
3. 2-layer students, all starting from the same weights (``OUT/s2-init``: T6's embeddings, layers
   [3, 6] (the uniform map), pooler and head, saved once), trained ``--epochs``, for each seed:
   ``ce`` (no KD), ``kd-t6`` / ``kd-cca-t6`` (KD without / with the CCA term, teacher T6),
   ``kd-t3`` / ``kd-cca-t3`` (the same from T3) and ``pesf-t6`` (PESF-KD from T6).

Every run is an ``mmkit distill`` command line (printed before it starts) with its own run folder
under OUT; a rerun resumes finished runs for free. The summary (accuracy mean +- sample std over
seeds, CCA/CKA of the mapped layers before and after) goes to OUT/summary.json and
OUT/summary.md; the CCA heatmaps of the seed-0 runs are in each run folder.

    python examples/distill_experiment.py [--out runs/distill-exp] [--seeds 0,1,2] [--epochs 3] [--jobs 2]

Set OMP_NUM_THREADS=1 with ``--jobs 2`` on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MMKIT = [sys.executable, "-m", "mmkit"]
TASK = ["--task", "builtin:sharegpt-match", "--eval-data", "builtin:sharegpt-match:test"]
KD_OFF = ["--set", "loss.kd.weight=0", "--set", "loss.hidden.weight=0", "--set", "loss.attention.weight=0",
          "--set", "loss.cca.weight=0", "--set", "loss.ce.weight=1"]
NO_CCA = ["--set", "loss.cca.weight=0"]
STUDENTS = {  # name -> (teacher, extra flags); None teacher = the method needs no teacher targets
    "ce": ("t6", KD_OFF),
    "kd-t6": ("t6", NO_CCA),
    "kd-cca-t6": ("t6", []),
    "kd-t3": ("t3", NO_CCA),
    "kd-cca-t3": ("t3", []),
    "pesf-t6": ("t6", None),
}


def run(cmd: list[str], out: Path) -> dict:
    """Run one mmkit command (resuming when its results exist) and return its results.json."""
    results = out / "results.json"
    if not results.is_file():
        print("+", shlex.join(["mmkit", *cmd]), flush=True)
        subprocess.run([*MMKIT, "-q", *cmd, "--out", str(out)], check=True)
    return json.loads(results.read_text())


def cut_student(teacher: str, layers: list[int], out: Path) -> str:
    """Save the teacher with only ``layers`` (1-based) as a model folder every student starts from."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mmkit.distill.bert_kd import keep_layers

    if not (out / "config.json").is_file():
        keep_layers(AutoModelForSequenceClassification.from_pretrained(teacher), layers).save_pretrained(out)
        AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/distill-exp")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--jobs", type=int, default=1, help="student runs at a time")
    args = parser.parse_args()
    out, seeds = Path(args.out), [int(s) for s in args.seeds.split(",")]
    common = [*TASK, "--max-len", str(args.max_len), "--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    diag = ["--set", "diagnostic.metrics=[cca,cka]", "--set", "diagnostic.max_examples=500"]

    # 1. T6 (fine-tuned by the first bert-kd run) and 2. T3 (CE on T6's layers 2, 4, 6).
    t6_run = run(["distill", "bert-kd", "--teacher", "bundled:minilm", "--student-layers", "3",
                  "--set", "student.init=teacher_layers", *common, "--epochs", str(args.teacher_epochs), *KD_OFF,
                  "--set", "teacher.finetune=true", "--set", f"teacher.train.epochs={args.teacher_epochs}",
                  "--set", f"teacher.train.lr={args.lr}", "--set", f"teacher.train.batch_size={args.batch_size}",
                  "--set", "diagnostic.enabled=false", "--seed", "0"], out / "t3")
    teachers = {"t6": str(out / "t3" / "teacher_finetune" / "model"), "t3": str(out / "t3" / "checkpoint")}
    acc = {"t6": t6_run["metrics"]["teacher"]["accuracy"], "t3": t6_run["metrics"]["student"]["accuracy"]}

    # 3. the students, all from T6's layers 3 and 6.
    init = cut_student(teachers["t6"], [3, 6], out / "s2-init")
    jobs = {}
    for name, (teacher, extra) in STUDENTS.items():
        for seed in seeds:
            base = ["--teacher", teachers[teacher], "--student", init, *common, "--epochs", str(args.epochs),
                    "--seed", str(seed)]
            method = ["distill", "pesf"] if extra is None else ["distill", "bert-kd", *extra, *diag]
            jobs[name, seed] = ([*method, *base], out / f"{name}-s{seed}")
    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(zip(jobs, pool.map(lambda job: run(*job), jobs.values())))
    rows = {name: [done[name, seed] for seed in seeds] for name in STUDENTS}

    summary = {"teachers": {k: {"path": v, "accuracy": acc[k]} for k, v in teachers.items()},
               "seeds": seeds, "args": vars(args), "students": {}}
    for name, results in rows.items():
        accs = [r["metrics"]["student"]["accuracy"] for r in results]
        entry = {"accuracy": accs, "mean": statistics.mean(accs),
                 "std": statistics.stdev(accs) if len(accs) > 1 else None}
        for when in ("before", "after"):
            key = f"cca_mapped_mean_{when}"
            if key in results[0]["metrics"]:
                entry[key] = {m: statistics.mean(r["metrics"][key][m] for r in results)
                              for m in results[0]["metrics"][key]}
        summary["students"][name] = entry
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["| student (2 layers) | teacher | accuracy % (mean +- std) | CCA mapped before -> after | CKA mapped before -> after |",
             "|---|---|---|---|---|"]
    for name, e in summary["students"].items():
        teacher = STUDENTS[name][0].upper()
        cca = cka = "-"
        if "cca_mapped_mean_after" in e:
            b, a = e["cca_mapped_mean_before"], e["cca_mapped_mean_after"]
            cca, cka = f"{b['cca']:.3f} -> {a['cca']:.3f}", f"{b['cka']:.3f} -> {a['cka']:.3f}"
        std = f"{e['std']:.2f}" if e["std"] is not None else "n/a"
        lines.append(f"| {name} | {teacher if name != 'ce' else '(none)'} | {e['mean']:.2f} +- {std} | {cca} | {cka} |")
    lines.append(f"\nTeachers: T6 {acc['t6']:.2f}%, T3 {acc['t3']:.2f}% (test accuracy).")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
