"""distill bert-kd: step time against a bare PyTorch loop, and epochs with the teacher cache.

    python benchmarks/distill.py [--examples 160] [--repeats 5] [--threads 1] [--quick]

Models (offline): the teacher is all-MiniLM-L6-v2 (``bundled:minilm``, 6 layers x 384, 12 heads)
loaded as a sequence classifier with a randomly initialised 2-class head (``teacher.finetune:
false``; speed does not depend on the weights); the student copies its embeddings and layers
2, 4, 6 (``student.init: teacher_layers``, 3 layers). Data: the first ``--examples`` rows of
``builtin:sharegpt-match`` (instruction / answer pairs) = one epoch, max_len 128, batch 16, fp32,
AdamW (lr 5e-5, weight decay 0.01), gradient clipping at 1.0. Two loss rows: CE + KD alone, and
the spec defaults (distill.md §1.6: CE + KD + hidden + attention (mse) + CCA).

Every bert-kd epoch is ``bert_kd.distil`` itself (the code ``mmkit distill bert-kd`` runs: the
``core.train`` loop, ``BertKdStep``, live or cached teacher targets), timed between optimizer
steps by a callback added to its loop (checkpoints off). The same callback runs a step written
by hand on the same batch, outside the timed intervals, alternately right after the loop's step
and right before the next one (A B B A ...), so each loop step has a partner measured under
the same machine load:

(a) bert-kd step, teacher live, vs (b) the bare loop: collate, teacher forward under
``no_grad``, student forward, the same loss terms (the ``core.losses`` functions, weights from
the resolved plan), backward, clipping, AdamW, on copies of the models. The bare loop takes the
teacher's attention maps the obvious way, from an eager copy of the teacher with
``output_attentions``; mmkit recomputes them from captured Q, K (the path the cache shares).

(c) bert-kd epoch reading the teacher targets from a built cache, vs (d) a student-only epoch:
the same student (sdpa attention) trained alone with CE, no teacher, stepped by hand on the
same batches. For context: a student-only epoch through the loop, the uncached (live) bert-kd
epochs of (a), and the one-time cache build. Last, the cached spec-defaults step runs with its
loss terms switched on one by one (forward + losses + backward), to show where its extra time goes.

The first step of every epoch is dropped from the paired figures (it allocates the loop's
AdamW state); epochs are interleaved over ``--repeats`` rounds, in a rotating order, after a
short warm-up round.

Writes the section "## distill bert-kd: step time and the teacher cache" of docs/performance.md.
Asserts nothing: it prints the ratios and whether each goal is met.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, write_section  # noqa: E402

from mmkit.core import losses  # noqa: E402
from mmkit.core.train import Callback, train  # noqa: E402
from mmkit.distill import bert_kd, textcls  # noqa: E402
from mmkit.distill.common import Indices, param_count  # noqa: E402
from mmkit.io import RunDir  # noqa: E402

PERF_DOC = ROOT / "docs" / "performance.md"
HEADING = "## distill bert-kd: step time and the teacher cache"
BATCH, MAX_LEN, STUDENT_LAYERS = 16, 128, 3
STEP_GOAL, EPOCH_GOAL = 1.05, 1.10
ROWS = {"ce+kd": "CE + KD", "defaults": "spec defaults (CE + KD + hidden + attention + CCA)"}
PHASES = ("collate", "teacher", "student forward", "losses", "backward", "clip + AdamW")
QUICK = {"examples": 64, "repeats": 3}
WARMUP_STEPS = 2
#: the cached step with the loss terms switched on one by one: (label, student attention, terms)
TERM_STEPS = (("CE + KD, sdpa student", "sdpa", ("ce", "kd")),
              ("CE + KD, eager student", "eager", ("ce", "kd")),
              ("+ hidden", "eager", ("ce", "kd", "hid")),
              ("+ attention (mse)", "eager", ("ce", "kd", "hid", "att")),
              ("+ CCA = spec defaults", "eager", ("ce", "kd", "hid", "att", "cca")))
TERM_PASSES = 3


# --------------------------------------------------------------------------- set-up


def make_config(row: str, examples: int, cache_dir: Path) -> bert_kd.BertKdConfig:
    """The bert-kd config of a loss row: MiniLM teacher with a new head, 3 copied layers."""
    cfg = bert_kd.BertKdConfig()
    cfg.teacher.id, cfg.teacher.finetune = "bundled:minilm", False
    cfg.student.init, cfg.student.num_layers = "teacher_layers", STUDENT_LAYERS
    cfg.data.task, cfg.data.max_len, cfg.data.max_examples = "builtin:sharegpt-match", MAX_LEN, examples
    cfg.train = dataclasses.replace(cfg.train, batch_size=BATCH, epochs=1, checkpoints=False)
    cfg.cache.dir = str(cache_dir)
    cfg.diagnostic.enabled = False
    if row == "ce+kd":
        cfg.loss.hidden.weight = cfg.loss.attention.weight = cfg.loss.cca.weight = 0.0
    cfg.validate()
    return cfg


class BareLoop:
    """The step written by hand, on a copy of the row's student and its teacher (an eager copy
    when the attention maps are needed; none for ``student_only``: CE alone); times each phase."""

    def __init__(self, setup: bert_kd.Setup, cfg: bert_kd.BertKdConfig, student_only: bool = False) -> None:
        self.plan = setup.plan
        self.w = {k: float(k == "ce") for k in setup.plan.weights} if student_only else setup.plan.weights
        self.teacher = None if student_only else setup.models.teacher
        if self.w["att"]:
            self.teacher = copy.deepcopy(self.teacher)
            self.teacher.set_attn_implementation("eager")
        self.student = copy.deepcopy(setup.models.student).train()
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.clip = cfg.train.max_grad_norm
        self.collate = textcls.Collate(setup.s_train, setup.train_set.labels)

    def step(self, rows: list[int]) -> dict[str, float]:
        marks = [time.perf_counter()]
        batch = self.collate(rows)
        inputs = {k: batch[k] for k in bert_kd.INPUT_KEYS if k in batch}
        states, maps = bool(self.w["hid"] or self.w["cca"]), bool(self.w["att"])
        marks.append(time.perf_counter())
        with torch.no_grad():
            t = self.teacher(**inputs, output_hidden_states=states, output_attentions=maps) if self.teacher else None
        marks.append(time.perf_counter())
        s = self.student(**inputs, output_hidden_states=states, output_attentions=maps)
        marks.append(time.perf_counter())
        loss = self.loss(s, t, batch)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        return dict(zip(PHASES, np.diff(marks)))

    def loss(self, s: Any, t: Any, batch: dict) -> torch.Tensor:
        """w_ce L_ce + w_kd L_kd (+ w_hid L_hid + w_att L_att + w_cca L_cca), distill.md §1.4."""
        p, w, mask = self.plan, self.w, batch["attention_mask"]
        total = w["ce"] * losses.ce_loss(s.logits, batch["labels"])
        if w["kd"]:
            total = total + w["kd"] * losses.kd_loss(s.logits, t.logits, p.temperature)
        if w["hid"]:
            total = total + w["hid"] * sum(losses.hidden_mse(s.hidden_states[j], t.hidden_states[m], mask)
                                           for j, m in p.hidden_pairs)
        if w["att"]:
            total = total + w["att"] * sum(losses.attention_mse(s.attentions[j - 1], t.attentions[m - 1], mask)
                                           for j, m in p.att_pairs)
        if w["cca"]:
            keep = mask.bool()
            total = total + w["cca"] * torch.stack([
                losses.cca_loss(s.hidden_states[j][keep], t.hidden_states[m][keep], p.cca.eps, p.cca.top_k)
                for j, m in p.cca_pairs]).mean()
        return total


class Timer(Callback):
    """Loop callback: each optimizer step's time, the epoch's and each batch's indices. With
    ``paired`` (a by-hand step) and the epoch's batch ``order``, also runs ``paired`` on every
    batch, alternately right after its loop step and right before the next one, outside the
    timed intervals; ``pairs[i]`` are the phase times of batch i's partner."""

    def __init__(self, paired: Callable[[list[int]], dict[str, float]] | None = None,
                 order: Sequence[list[int]] = ()) -> None:
        self.paired, self.order = paired, list(order)
        self.steps: list[float] = []
        self.rows: list[list[int]] = []
        self.pairs: list[dict[str, float]] = []
        self.epoch: float | None = None

    def on_train_begin(self, state: Any) -> None:
        self.steps, self.rows, self.pairs, self.epoch, self.outside = [], [], [], None, 0.0
        self.start = self.last = time.perf_counter()

    def on_batch_end(self, state: Any, batch: dict, outputs: Any) -> None:
        self.rows.append(batch["index"].tolist())

    def on_step_end(self, state: Any, logs: dict) -> None:
        now = time.perf_counter()
        self.steps.append(now - self.last)
        i = len(self.steps) - 1
        if self.paired is not None and i % 2 == 0:
            self.pairs += [self.paired(rows) for rows in self.order[i:i + 2]]  # after step i, before step i + 1
        self.last = time.perf_counter()
        self.outside += self.last - now

    def on_epoch_end(self, state: Any) -> None:
        self.epoch = time.perf_counter() - self.start - self.outside


@contextlib.contextmanager
def timed(timer: Timer, teacher: torch.nn.Module) -> Iterator[None]:
    """Run ``bert_kd.distil`` with ``timer`` added to its loop's callbacks (its ``train`` is
    wrapped for the call), so the timed code is exactly what the command runs. Afterwards the
    Q/K/V capture hooks the call left on the teacher are removed: a run calls ``distil`` once,
    this benchmark many times on the same models."""
    original = bert_kd.train
    linears = [getattr(bert_kd.self_attention(teacher, j), p)
               for j in range(1, len(bert_kd.encoder_layers(teacher)) + 1) for p in ("query", "key", "value")]
    before = [set(m._forward_hooks) for m in linears]

    def with_timer(*args: Any, callbacks: Sequence[Callback] = (), **kwargs: Any) -> Any:
        return original(*args, callbacks=[*callbacks, timer], **kwargs)

    bert_kd.train = with_timer
    try:
        yield
    finally:
        bert_kd.train = original
        for m, keep in zip(linears, before):
            for key in set(m._forward_hooks) - keep:
                del m._forward_hooks[key]


def run_distil(cfg: bert_kd.BertKdConfig, setup: bert_kd.Setup, folder: Path, cache: str, timer: Timer,
               max_steps: int | None = None) -> dict[str, Any]:
    """One ``distil`` call in a fresh run folder (removed afterwards); returns its metrics."""
    cfg.cache.mode = cache
    cfg.train = dataclasses.replace(cfg.train, max_steps=max_steps)
    folder.mkdir(parents=True)
    with timed(timer, setup.models.teacher):
        metrics = bert_kd.distil(cfg, setup, RunDir(path=folder, command=bert_kd.COMMAND, resumed=False))
    shutil.rmtree(folder)
    if cache == "on" and metrics["cache"] != "hit":
        print(f"warning: teacher cache status {metrics['cache']!r}", file=sys.stderr)
    return metrics


def student_only_epoch(student: torch.nn.Module, setup: bert_kd.Setup, cfg: bert_kd.BertKdConfig,
                       folder: Path, timer: Timer, max_steps: int | None = None) -> None:
    """The student alone (CE) through the same loop, collate and settings."""
    def ce(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        inputs = {k: batch[k] for k in bert_kd.INPUT_KEYS if k in batch}
        return {"loss": losses.ce_loss(model(**inputs).logits, batch["labels"])}

    train(student, ce, Indices(len(setup.train_set)), dataclasses.replace(cfg.train, max_steps=max_steps), folder,
          collate_fn=textcls.Collate(setup.s_train, setup.train_set.labels), callbacks=[timer], final_dir=None)
    shutil.rmtree(folder)


def cache_reads(cfg: bert_kd.BertKdConfig, setup: bert_kd.Setup, batches: list[list[int]]) -> float:
    """Seconds to read one epoch's teacher targets back from the built cache."""
    cfg.cache.mode = "on"
    source, _, _ = bert_kd.teacher_source(cfg, setup)
    start = time.perf_counter()
    for rows in batches:
        source({"index": torch.tensor(rows)})
    return time.perf_counter() - start


def term_costs(cfg: bert_kd.BertKdConfig, setup: bert_kd.Setup, order: list[list[int]]) -> dict[str, list[float]]:
    """Forward + loss terms + backward (no optimizer step) of the cached defaults step with the
    terms of :data:`TERM_STEPS` switched on one by one, through ``bert_kd.kd_terms`` with targets
    read from the cache, on copies of the student; the order rotates per batch, after a warm-up pass."""
    cfg.cache.mode = "on"
    source, _, _ = bert_kd.teacher_source(cfg, setup)
    eager = copy.deepcopy(setup.models.student)
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    width = eager.config.hidden_size
    modules = {"eager": bert_kd.KdStudent(eager, width, width, 0), "sdpa": bert_kd.KdStudent(sdpa, width, width, 0)}
    collate = textcls.Collate(setup.s_train, setup.train_set.labels)
    times: dict[str, list[float]] = {label: [] for label, _, _ in TERM_STEPS}
    for p in range(TERM_PASSES + 1):
        for i, rows in enumerate(order):
            k = (p + i) % len(TERM_STEPS)
            for label, kind, terms in TERM_STEPS[k:] + TERM_STEPS[:k]:
                weights = {t: w if t in terms else 0.0 for t, w in setup.plan.weights.items()}
                start = time.perf_counter()
                batch = collate(rows)
                batch["index"] = torch.tensor(rows)
                values, _ = bert_kd.kd_terms(setup.plan, modules[kind], batch, source(batch), weights)
                sum(weights[t] * v for t, v in values.items()).backward()
                if p:
                    times[label].append(time.perf_counter() - start)
                modules[kind].zero_grad(set_to_none=True)
    return times


# --------------------------------------------------------------------------- report


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def listed(values: Sequence[float], digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def verdict(main: float, check: float, goal: float) -> str:
    """Met or missed by the headline estimate, and whether the second estimate agrees."""
    if (main <= goal) != (check <= goal):
        return f"{'met' if main <= goal else '**missed**'}, but not by the other estimate: within this run's noise"
    return "met" if main <= goal else "**missed**"


def report(args: argparse.Namespace, info: str, facts: dict[str, Any], res: dict[str, Any],
           loads: tuple[float, float], wall: float) -> list[str]:
    command = f"python benchmarks/distill.py --examples {args.examples} --repeats {args.repeats} --threads {args.threads}"
    steps = facts["epoch_steps"]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} with `{command}`"
        + (" (the `--quick` sizes)" if args.quick else "") + f"; whole run {wall / 60:.1f} min.",
        "",
        f"- Machine: {info}. 1-minute load average {loads[0]:.2f} before the measured rounds, {loads[1]:.2f} "
        "after (a shared machine: absolute times are noisy); read the side-by-side ratios, and "
        "each goal is judged by two estimates (a verdict the two disagree on is within this run's noise).",
        f"- Teacher: all-MiniLM-L6-v2 (`bundled:minilm`, 6 layers x 384, 12 heads, {facts['teacher_params']:,} "
        "parameters) as a sequence classifier with a **randomly initialised 2-class head** (`teacher.finetune: "
        "false`; speed does not depend on the weights). Student: its embeddings and layers "
        f"{facts['layer_map']} (`student.init: teacher_layers`, {STUDENT_LAYERS} x 384, "
        f"{facts['student_params']:,} parameters); the widths agree, so there is no projection W_h.",
        f"- Data: the first {args.examples} rows of `builtin:sharegpt-match` (instruction / answer pairs) = one "
        f"epoch of {steps} steps; max_len {MAX_LEN}, batch {BATCH} ({facts['mean_tokens']:.0f} tokens per row on "
        f"average, {facts['full_rows']:.0%} cut at {MAX_LEN}; batches padded to their longest row). fp32, AdamW "
        "lr 5e-5, weight decay 0.01, gradient clipping 1.0, linear schedule; checkpoints off while timing.",
        f"- Loss rows: **{ROWS['ce+kd']}** (hidden, attention and CCA weights 0) and **{ROWS['defaults']}**: "
        "weights 0.5 / 0.5 / 1.0 / 1.0 / 0.1, attention mode mse (equal head counts), so that student runs "
        f"eager attention to return its maps; the CCA term was skipped in {facts['cca_skipped']} of "
        f"{facts['cca_batches']} batches.",
        f"- Method: each bert-kd epoch is `bert_kd.distil` (the code `mmkit distill bert-kd` runs), timed between "
        "optimizer steps by a callback added to its loop. The callback also runs a by-hand step on each batch, "
        "outside the timed intervals, alternately right after the loop's step and right before the next "
        "(A B B A ...), so every loop step has a partner on the same batch under the same load. Epochs of the "
        f"four kinds plus a student-only loop epoch rotate over {args.repeats} rounds after a "
        f"{WARMUP_STEPS}-step warm-up of each; the first step of every epoch (the loop's AdamW state "
        f"allocation) is left out of the paired figures, so each paired cell holds "
        f"{args.repeats * (steps - 1)} steps.",
        "",
        "### (a) bert-kd step vs (b) bare PyTorch loop",
        "",
        "(a) teacher live (`TeacherTargets`; `BertKdStep`; the `core.train` loop); (b) collate + teacher forward "
        "(`no_grad`) + student forward + the same `core.losses` terms + backward + clipping + AdamW, by hand; it "
        "takes the teacher's attention maps from an eager copy with `output_attentions` (mmkit recomputes them "
        "from captured Q, K).",
        "",
        f"| loss terms | (a) mmkit step (s) | (b) bare step (s) | a / b = ratio of the medians | median of the "
        f"{args.repeats * (steps - 1)} per-pair ratios | goal a / b <= {STEP_GOAL} |",
        "|---|---|---|---|---|---|",
    ]
    for row, label in ROWS.items():
        a, b = res["a"][row], res["b"][row]
        paired = med([x / y for x, y in zip(a, b)])
        lines.append(f"| {label} | {med(a):.3f} | {med(b):.3f} | **{med(a) / med(b):.3f}** | {paired:.3f} | "
                     f"{verdict(med(a) / med(b), paired, STEP_GOAL)} |")
    lines += ["", "Where a by-hand step's time goes (median seconds per phase); the first row is (d), the "
              "student alone:", "",
              "| step | " + " | ".join(PHASES) + " | step |", "|---|" + "---|" * (len(PHASES) + 1)]
    for row, label in {"student": "student only, CE (sdpa)", **ROWS}.items():
        phases = res["phases"][row]
        total = [sum(p) for p in zip(*phases.values())]
        lines.append(f"| {label} | " + " | ".join(f"{med(phases[p]):.3f}" for p in PHASES) + f" | {med(total):.3f} |")
    loop_d = med(res["epoch"]["student"])
    lines += [
        "",
        "### (c) bert-kd epoch with the teacher cache vs (d) student-only epoch",
        "",
        "(c) reads the teacher targets from the built cache (status `hit`; no teacher forward); (d) is the same "
        "student (sdpa attention) trained alone with CE, stepped by hand on the same batches as the partner of "
        "each (c) step. Paired epoch ratio = sum of the (c) step times over the epoch / sum of the partners' "
        "(first step left out), median over the rounds. \"Through the loop\" = whole epochs (all steps, the "
        "loop's start-up included, partner steps excluded), medians, with the student-only epoch also run "
        "through the loop; individual rounds in brackets.",
        "",
        f"| epoch | (c) / (d), paired | through the loop (s) | through the loop: / student-only loop epoch | "
        f"goal (c) / (d) <= {EPOCH_GOAL} |",
        "|---|---|---|---|---|",
        f"| (d) student only, CE | 1.000 | {loop_d:.2f} [{listed(res['epoch']['student'])}] | 1.000 | |",
    ]
    for row, label in ROWS.items():
        ratios = [sum(c[1:]) / sum(d[1:]) for c, d in res["cd"][row]]
        loop_c = res["epoch"][("cached", row)]
        lines.append(f"| (c) {label}, teacher cache | **{med(ratios):.3f}** [{listed(ratios, 3)}] | {med(loop_c):.2f} "
                     f"[{listed(loop_c)}] | {med(loop_c) / loop_d:.3f} | "
                     f"{verdict(med(ratios), med(loop_c) / loop_d, EPOCH_GOAL)} |")
    for row, label in ROWS.items():
        loop_u = res["epoch"][("live", row)]
        lines.append(f"| {label}, teacher live (no cache) | | {med(loop_u):.2f} [{listed(loop_u)}] | "
                     f"{med(loop_u) / loop_d:.3f} | context |")
    terms = res["terms"]
    first = med(terms[TERM_STEPS[0][0]])
    lines += ["", "Where the cached spec-defaults step's extra time goes: its cache read + forward + loss terms + "
              "backward (no optimizer step) with the terms switched on one by one through `bert_kd.kd_terms`, on "
              "copies of the student, the order rotating per batch after a warm-up pass; medians of "
              f"{TERM_PASSES * steps} steps each.", "",
              "| cached step | read + forward + losses + backward (s) | added by this line (s) | / first line |",
              "|---|---|---|---|"]
    previous = None
    for label, _, _ in TERM_STEPS:
        value = med(terms[label])
        added = "" if previous is None else f"{value - previous:+.3f}"
        lines.append(f"| {label} | {value:.3f} | {added} | {value / first:.3f} |")
        previous = value
    lines += [""]
    for row, label in ROWS.items():
        build = res["build"][row]
        lines.append(f"- Cache for {label}: built once in {build['seconds']:.1f} s ({args.examples} examples, "
                     f"{build['mb']:.1f} MB: {build['targets']}; the build includes hashing the teacher's weights "
                     f"for the key); reading one epoch's targets back takes {res['reads'][row]:.3f} s.")
    lines.append("- Why the spec-defaults row misses 1.10 with a cache that costs almost nothing to read: the extra "
                 "time is the student's own loss arithmetic, which no cache removes. Per mapped layer and N tokens "
                 "of width d, the CCA term's Gram products (X^T X, X^T Y, Y^T Y forward, two more backward) are "
                 "about 10 N d^2 flops and its d x d SVD comes on top, against about 72 N d^2 for the layer's "
                 "own forward and backward (12 d^2 multiply-adds per token, three passes): some 14 % per layer "
                 "before the SVD; attention transfer needs the eager maps and their backward.")
    return lines


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=160, help=f"training rows = one epoch (default 160; "
                    f"a multiple of the batch, {BATCH})")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds after the warm-up (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared; "
                    "0 = torch's own choice)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smaller sizes for a slow machine: {', '.join(f'--{k} {v}' for k, v in QUICK.items())}")
    args = ap.parse_args()
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.examples < 2 * BATCH or args.examples % BATCH:
        raise SystemExit(f"--examples must be a multiple of {BATCH}, at least {2 * BATCH}")
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    from mmkit.core.seeding import seed_everything

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    info = machine_info()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmkit-bench-distill-") as tmp:
        folder = Path(tmp)
        os.environ["MMKIT_CACHE"] = str(folder / "cache")  # the task file and the teacher cache stay in tmp
        seed_everything(0)
        cfgs = {row: make_config(row, args.examples, folder / "teacher-cache") for row in ROWS}
        setups = {row: bert_kd.prepare(cfg, None) for row, cfg in cfgs.items()}
        for setup in setups.values():
            setup.eval_set = None  # no task evaluation after each timed epoch (the test split's 500 rows)
        bare = {row: BareLoop(setups[row], cfgs[row]) for row in ROWS}  # before any capture hook is installed
        bare["student"] = BareLoop(setups["ce+kd"], cfgs["ce+kd"], student_only=True)
        student = copy.deepcopy(setups["ce+kd"].models.student)  # for the student-only loop epochs
        counter = iter(range(10 ** 6))

        def run_dir() -> Path:
            return folder / "runs" / str(next(counter))

        res: dict[str, Any] = {"build": {}, "a": {row: [] for row in ROWS}, "b": {row: [] for row in ROWS},
                               "cd": {row: [] for row in ROWS}, "phases": {k: {p: [] for p in PHASES} for k in bare},
                               "epoch": {"student": [], **{(k, row): [] for k in ("cached", "live") for row in ROWS}}}
        for row in ROWS:
            cfgs[row].cache.mode = "on"
            start = time.perf_counter()
            source, status, live = bert_kd.teacher_source(cfgs[row], setups[row])
            res["build"][row] = {"seconds": time.perf_counter() - start, "status": status,
                                 "mb": sum(e["bytes"] for e in source.reader.shards) / 1024 ** 2,
                                 "targets": ", ".join(t.name for t in live.targets)}
            print(f"teacher cache {row}: {status} in {res['build'][row]['seconds']:.1f} s", file=sys.stderr)

        first = Timer()  # the epoch's batch order (a pure function of the seed), and a first warm-up
        run_distil(cfgs["ce+kd"], setups["ce+kd"], run_dir(), "on", first)
        order = first.rows
        facts: dict[str, Any] = {"epoch_steps": len(order)}

        def epoch(kind: Any, keep: bool) -> None:
            max_steps = None if keep else WARMUP_STEPS
            if kind == "student":
                timer = Timer()
                student_only_epoch(student, setups["ce+kd"], cfgs["ce+kd"], run_dir(), timer, max_steps)
            else:
                source, row = kind
                timer = Timer(bare[row if source == "live" else "student"].step, order)
                metrics = run_distil(cfgs[row], setups[row], run_dir(), "off" if source == "live" else "on", timer,
                                     max_steps)
                if row == "defaults":
                    facts.update(cca_skipped=metrics["cca_skipped_batches"], cca_batches=metrics["cca_batches"])
                if keep and timer.rows != order:
                    print("warning: the loop's batches differ from the recorded order", file=sys.stderr)
                if keep:
                    partners = [sum(p.values()) for p in timer.pairs]
                    if source == "live":
                        res["a"][row] += timer.steps[1:]
                        res["b"][row] += partners[1:]
                    else:
                        res["cd"][row].append((timer.steps, partners))
                    for p in timer.pairs[1:]:
                        for name in PHASES:
                            res["phases"][row if source == "live" else "student"][name].append(p[name])
            if keep:
                res["epoch"][kind].append(timer.epoch)
            print(f"{'epoch' if keep else 'warm-up'} {kind}: {timer.epoch or sum(timer.steps):.2f} s", file=sys.stderr)

        kinds = list(res["epoch"])
        for kind in kinds:  # warm-up: thread pools, allocator, first optimizer steps, the bare loops
            epoch(kind, keep=False)
        load_before = os.getloadavg()[0]
        for r in range(args.repeats):
            for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                epoch(kind, keep=True)
        load_after = os.getloadavg()[0]
        res["reads"] = {row: cache_reads(cfgs[row], setups[row], order) for row in ROWS}
        res["terms"] = term_costs(cfgs["defaults"], setups["defaults"], order)

        s = setups["defaults"]
        lengths = s.s_train.lengths
        facts.update(teacher_params=param_count(s.models.teacher), student_params=param_count(s.models.student),
                     layer_map=s.layer_map, mean_tokens=float(lengths.mean()),
                     full_rows=float((lengths >= MAX_LEN).mean()))

    lines = report(args, info, facts, res, (load_before, load_after), time.perf_counter() - started)
    print("\n".join(lines))
    write_section(PERF_DOC, HEADING, lines)
    print(f"\nwrote {PERF_DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
