"""Chaos test of kill and resume: SIGKILL the teacher and the student at random moments, rerun, compare.

Teacher: each attempt runs `pipeline run teacher` as its own process and SIGKILLs it at a moment
chosen at random from four kinds, so that every phase of a run is hit without any hook in the code:

    startup   a random delay after the process starts (imports, model load, manifest creation)
    forward   a random delay after the loop starts (mostly in a forward pass; past the last shard: teardown)
    write     as soon as a new shard data directory appears (zarr arrays being written and fsynced)
    publish   as soon as a temporary marker appears in published/ (the atomic publish step)

After each kill it checks what a reader can see: `verify()` reports nothing but unpublished shards,
every published marker equals the uninterrupted run's (checksums, token count, skipped ids), and
`read_items` reads every published item; so a shard that was being written is never readable as
published. A kill that lands outside the phase it aimed at (the poll that fires it ran late, as on a
busy machine) is checked the same way but not counted, and its kind is tried again. The next attempt
resumes the same store; when an attempt finishes before its kill, the store must be identical to the
uninterrupted run (manifest apart from volatile fields, content digest, every item's token ids and
hidden states bit for bit), and a fresh store starts.

Student: `pipeline run student` is SIGKILLed after a random number of logged steps (between
checkpoints) and resumed until it finishes; its heads must equal an uninterrupted run's bit for bit,
and every step it logged twice (before a kill and again after resuming) must have logged the same losses.

Every process runs with OMP_NUM_THREADS=1, so bit-exact comparisons compare like with like.

    python scripts/chaos.py                      # 12 teacher kills, 4 student kills, in ./chaos-work
    python scripts/chaos.py --kills 30 --student-kills 6 --seed 3 --workdir /tmp/chaos
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from storage import layout
from storage._root import Root
from storage.inspection import info, verify
from storage.manifest import VOLATILE
from storage.reader import read_items

PIPELINE = [sys.executable, "-m", "pipeline.cli"]
TEACHER_MODES = ("startup", "forward", "write", "publish")
# Where a kill of each kind counts. The poll that fires it can be late (a busy machine), so a kill may land
# after its phase; it is checked like any other, then retried, and not counted.
LANDS_IN = {"startup": {"startup"}, "forward": {"forward", "teardown"}, "write": {"write"}, "publish": {"publish"}}
MAX_MISSES = 20  # attempts in a row that miss their kind before the run gives up
WAIT_S = 1800  # a bound on any one run: generous, since a loaded machine runs many times slower
NOT_PUBLISHED = "shards are not published"  # the one problem verify() may report for a resumable store


@dataclass
class Setup:
    """The model, data and sizes one chaos run uses (small enough for a laptop CPU)."""

    workdir: str
    model_dpath: str
    data_root: str
    num_queries: int = 48
    shots: int = 4
    shard_size: int = 4
    student_queries: int = 16
    env: dict = field(default_factory=dict)


def prepare(workdir: str, *, num_queries: int = 48, shard_size: int = 4, student_queries: int = 16) -> Setup:
    """A tiny Idefics2 and a synthetic VQA set under workdir (reused when already there)."""
    from stages.models.tiny import make_model
    from stages.tasks.synthetic import write_synthetic

    os.makedirs(workdir, exist_ok=True)
    model_dpath = os.path.join(workdir, "model")
    if not os.path.isfile(os.path.join(model_dpath, "model.safetensors")):
        make_model("idefics2", model_dpath, seed=0)
    data_root = os.path.join(workdir, "data")
    write_synthetic(data_root, n_train=max(num_queries, student_queries), n_val=4, seed=0)
    return Setup(workdir, model_dpath, data_root, num_queries, shard_size=shard_size,
                 student_queries=student_queries, env=child_env(workdir))


def child_env(workdir: str) -> dict:
    """Environment of every child process: unbuffered (the kill waits on a printed line), one thread."""
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "MIMIC_PIPELINE_HOME": os.path.join(workdir, "home"),
            "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _sets(**values) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k.replace('__', '.')}={v}")]


def teacher_cmd(setup: Setup, store: str, num_queries: int | None = None) -> list[str]:
    return [*PIPELINE, "run", "teacher", *_sets(model__path=setup.model_dpath, task__root=setup.data_root,
            teacher__store=store, task__num_queries=num_queries or setup.num_queries, teacher__shots=setup.shots,
            teacher__shard_size=setup.shard_size)]


def _start(cmd: list[str], setup: Setup, log_fpath: str) -> subprocess.Popen:
    with open(log_fpath, "a") as log:
        return subprocess.Popen(cmd, env=setup.env, stdout=log, stderr=subprocess.STDOUT, cwd=setup.workdir)


def _finish(proc: subprocess.Popen, log_fpath: str) -> None:
    try:
        proc.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{' '.join(proc.args[2:5])} still running after {WAIT_S} s; log {log_fpath}") from None
    if proc.returncode != 0:
        with open(log_fpath) as f:
            tail = f.read()[-3000:]
        raise AssertionError(f"{' '.join(proc.args[2:5])} exited {proc.returncode}; log {log_fpath}:\n{tail}")


def _working(log_fpath: str) -> bool:
    """The teacher has set up and entered its loop (it prints how many shards it will write)."""
    with open(log_fpath, errors="replace") as f:
        return "shards to write" in f.read()


def _listdir(dpath: str) -> set[str]:
    try:
        return set(os.listdir(dpath))
    except FileNotFoundError:
        return set()


# -- the teacher -----------------------------------------------------------------------------------
def _markers(store: str) -> dict[int, dict]:
    """Published shard -> marker fields apart from the volatile data path."""
    root = Root(store)
    markers, problems = layout.load_markers(root, layout.read_manifest(root))
    assert not problems, problems
    return {s: {k: v for k, v in m.__dict__.items() if k != "data"} for s, m in markers.items()}


def _manifest(store: str) -> dict:
    return {k: v for k, v in json.loads(Root(store).read(layout.MANIFEST)).items() if k not in VOLATILE}


def check_resumable(store: str, reference: dict[int, dict]) -> int:
    """What a reader sees in a killed store: only unpublished shards missing, every published shard
    equal to the uninterrupted run's and readable. Returns the number of published shards."""
    if not os.path.isfile(os.path.join(store, layout.MANIFEST)):
        return 0  # killed before the manifest existed: there is no store yet
    problems = [p for p in verify(store) if NOT_PUBLISHED not in p]
    assert not problems, f"{store} after a kill: {problems}"
    markers = _markers(store)
    for s, marker in markers.items():
        assert marker == reference[s], f"{store}: shard {s} published with other contents than the uninterrupted run"
    n_items = sum(1 for _ in read_items(store))
    manifest = layout.read_manifest(Root(store))
    expected = sum(len(layout.kept_queries(manifest, s, reference[s]["skipped"])) for s in markers) * manifest.views
    assert n_items == expected, f"{store}: {n_items} items readable, {expected} published"
    return len(markers)


def assert_identical(store: str, reference_store: str) -> None:
    """Identical in the sense of PROTOCOL.md: manifest apart from volatile fields, markers apart from
    `data`, and every item bit for bit."""
    import torch

    assert verify(store) == [], verify(store)
    assert _manifest(store) == _manifest(reference_store), "manifests differ"
    assert info(store)["content_digest"] == info(reference_store)["content_digest"], "content digests differ"
    assert _markers(store) == _markers(reference_store), "markers differ"
    pairs = list(zip(read_items(store), read_items(reference_store), strict=True))
    for x, y in pairs:
        assert (x.sample_id, x.view, tuple(x.icd_ids)) == (y.sample_id, y.view, tuple(y.icd_ids))
        assert np.array_equal(x.token_ids, y.token_ids), f"{x.sample_id}/{x.view}: token ids differ"
        assert torch.equal(x.hidden, y.hidden), f"{x.sample_id}/{x.view}: hidden states differ"


def _temporary_markers(store: str) -> set[str]:
    return {n for n in _listdir(os.path.join(store, layout.PUBLISHED)) if n.startswith(".")}


def _phase(store: str, log_fpath: str, dirs_before: set[str], tmp_markers: bool) -> str:
    """Where the kill landed, read from what it left behind (new files only: earlier kills leave some)."""
    if not os.path.isfile(os.path.join(store, layout.MANIFEST)) or not _working(log_fpath):
        return "startup"
    if tmp_markers:
        return "publish"
    manifest = layout.read_manifest(Root(store))
    markers = layout.load_markers(Root(store), manifest)[0]
    if _listdir(os.path.join(store, layout.SHARDS)) - dirs_before - {m.data.split("/")[1] for m in markers.values()}:
        return "write"
    return "teardown" if len(markers) == manifest.n_shards else "forward"


def _wait_and_kill(proc: subprocess.Popen, log_fpath: str, store: str, mode: str, rng: random.Random,
                   work_s: float, startup_s: float) -> tuple[bool, bool]:
    """Kill proc at a moment of kind `mode`. Returns (killed, a new temporary marker was there at the kill)."""
    shards = os.path.join(store, layout.SHARDS)
    dirs_before, tmp_before = _listdir(shards), _temporary_markers(store)
    t0 = time.monotonic()
    deadline = t0 + rng.uniform(0, startup_s) if mode == "startup" else None
    while proc.poll() is None:
        now = time.monotonic()
        if mode == "startup":
            fire = now >= deadline or _working(log_fpath)
        elif mode == "forward":
            if deadline is None and _working(log_fpath):
                deadline = now + rng.uniform(0, work_s)
            fire = deadline is not None and now >= deadline
        elif mode == "write":
            fire = bool(_listdir(shards) - dirs_before)
        else:
            fire = bool(_temporary_markers(store) - tmp_before)
        if fire:
            proc.send_signal(signal.SIGKILL)
            killed = proc.wait() == -signal.SIGKILL
            return killed, bool(_temporary_markers(store) - tmp_before)
        time.sleep(0.0005 if mode in ("write", "publish") else 0.005)
    return False, False


def teacher_chaos(setup: Setup, kills: int, rng: random.Random, say=print, modes=TEACHER_MODES) -> list[dict]:
    """SIGKILL the teacher `kills` times at random moments, resuming each time; see the module docstring."""
    work = setup.workdir
    log_fpath = os.path.join(work, "logs", "teacher-reference.log")
    reference_store = os.path.join(work, "teacher-reference")
    shutil.rmtree(reference_store, ignore_errors=True)
    open(log_fpath, "w").close()
    t0 = time.monotonic()
    proc = _start(teacher_cmd(setup, reference_store), setup, log_fpath)
    while proc.poll() is None and not _working(log_fpath):
        time.sleep(0.005)
    startup_s = time.monotonic() - t0
    _finish(proc, log_fpath)
    work_s = max(0.05, time.monotonic() - t0 - startup_s)
    reference = _markers(reference_store)
    say(f"teacher reference: {len(reference)} shards; startup {startup_s:.1f} s, work {work_s:.2f} s")

    records, round_, attempts, misses = [], 0, 0, 0
    store = None
    while len(records) < kills or store is not None:
        if store is None:
            round_ += 1
            store = os.path.join(work, f"teacher-chaos-{round_}")
            shutil.rmtree(store, ignore_errors=True)
        attempts += 1
        mode = modes[len(records) % len(modes)] if len(records) < kills else None  # a missed kind is tried again
        assert misses < MAX_MISSES, f"{misses} attempts in a row aimed at {mode} did not land in it; logs in {work}/logs"
        dirs_before = _listdir(os.path.join(store, layout.SHARDS))
        log_fpath = os.path.join(work, "logs", f"teacher-{attempts:03d}.log")
        open(log_fpath, "w").close()
        proc = _start(teacher_cmd(setup, store), setup, log_fpath)
        if mode is None:  # kills done: finish the store
            _finish(proc, log_fpath)
            killed = False
        else:
            killed, tmp = _wait_and_kill(proc, log_fpath, store, mode, rng, work_s, startup_s)
        if killed:
            phase = _phase(store, log_fpath, dirs_before, tmp)
            n_published = check_resumable(store, reference)  # whatever the phase, the store must be consistent
            if phase not in LANDS_IN[mode]:
                misses += 1
                say(f"kill aimed at {mode} landed in {phase} (round {round_}): store readable and consistent; "
                    "not counted, retried")
                continue
            records.append({"round": round_, "aimed": mode, "phase": phase, "published": n_published,
                            "retries": misses})
            misses = 0
            say(f"kill {len(records):2d} (round {round_}): aimed at {mode:8s} landed in {phase:8s}; "
                f"{n_published}/{len(reference)} shards published; store readable and consistent")
            continue
        if mode is not None:  # the run finished before its kill: a miss too
            misses += 1
            _finish(proc, log_fpath)
        assert_identical(store, reference_store)
        left = info(store)
        say(f"round {round_}: store complete and identical to the uninterrupted run "
            f"(digest {left['content_digest'][:12]}; leftovers: {len(left['unpublished_dirs'])} unpublished dirs, "
            f"{len(_temporary_markers(store))} temporary markers)")
        store = None
    return records


# -- the student -----------------------------------------------------------------------------------
def student_cmd(setup: Setup, store: str, out: str, save_every: int) -> list[str]:
    return [*PIPELINE, "run", "student", *_sets(model__path=setup.model_dpath, task__root=setup.data_root,
            teacher__store=store, task__num_queries=setup.student_queries, teacher__shots=setup.shots,
            teacher__shard_size=setup.shard_size, student__out=out, student__save_every=save_every)]


def _student_step(log_fpath: str) -> int:
    """The last step the student's progress bar shows in its log (0 before the loop)."""
    with open(log_fpath, errors="replace") as f:
        steps = re.findall(r"student: +\d+%\|[^|]*\| *(\d+)/\d+", f.read())
    return int(steps[-1]) if steps else 0


def _log_rows(out: str) -> list[dict]:
    fpath = os.path.join(out, "losses.jsonl")
    if not os.path.isfile(fpath):
        return []
    with open(fpath) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def student_chaos(setup: Setup, kills: int, rng: random.Random, say=print, save_every: int = 4) -> list[dict]:
    """SIGKILL the student after a random number of steps `kills` times, resume, compare heads."""
    from safetensors.numpy import load_file

    work = setup.workdir
    log_fpath = os.path.join(work, "logs", "student.log")
    store = os.path.join(work, "student-store")
    if setup.student_queries == setup.num_queries and os.path.isdir(os.path.join(work, "teacher-reference")):
        store = os.path.join(work, "teacher-reference")  # the teacher chaos's uninterrupted store
    elif not os.path.isfile(os.path.join(store, layout.MANIFEST)) or verify(store):
        shutil.rmtree(store, ignore_errors=True)
        _finish(_start(teacher_cmd(setup, store, setup.student_queries), setup, log_fpath), log_fpath)
    reference, chaos = os.path.join(work, "student-reference"), os.path.join(work, "student-chaos")
    for d in (reference, chaos):
        shutil.rmtree(d, ignore_errors=True)
    _finish(_start(student_cmd(setup, store, reference, save_every), setup, log_fpath), log_fpath)  # uninterrupted
    total = _log_rows(reference)[-1]["step"]
    say(f"student reference: {total} steps, a checkpoint every {save_every}")

    records, attempt = [], 0
    latest = os.path.join(chaos, "checkpoints", "last_complete")  # the student's atomic pointer
    while True:
        attempt += 1
        log_fpath = os.path.join(work, "logs", f"student-{attempt:03d}.log")
        done = int(open(latest).read().strip().removeprefix("step")) if os.path.isfile(latest) else 0
        proc = _start(student_cmd(setup, store, chaos, save_every), setup, log_fpath)
        if len(records) >= kills or done + 1 >= total:
            _finish(proc, log_fpath)
            break
        target = rng.randint(done + 1, total - 1)  # a step after the last checkpoint, before the end
        while proc.poll() is None and _student_step(log_fpath) < target:
            time.sleep(0.002)
        if proc.poll() is not None:
            _finish(proc, log_fpath)
            break
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert not os.path.exists(os.path.join(chaos, "heads", "heads.json")), "heads written by a killed run"
        tag = open(latest).read().strip() if os.path.isfile(latest) else None
        records.append({"after_step": _student_step(log_fpath), "resumed_from": done, "checkpoint": tag})
        say(f"student kill {len(records)}: resumed from step {done}, killed after step {_student_step(log_fpath)} "
            f"(last checkpoint now {tag or 'none'})")

    a, b = load_file(os.path.join(reference, "heads", "heads.safetensors")), \
        load_file(os.path.join(chaos, "heads", "heads.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), "heads differ from the uninterrupted run"
    by_step: dict[int, set] = {}
    for row in _log_rows(chaos):
        by_step.setdefault(row["step"], set()).add(json.dumps(row, sort_keys=True))
    assert sorted(by_step) == list(range(1, total + 1)), "steps missing from losses.jsonl"
    differing = [s for s, rows in by_step.items() if len(rows) > 1]
    assert not differing, f"steps logged with different losses before and after a resume: {differing[:5]}"
    say(f"student: {len(records)} kills, heads identical to the uninterrupted run")
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=12, help="teacher kills (at least 10 for the issue's bar)")
    p.add_argument("--student-kills", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="chaos-work")
    p.add_argument("--num-queries", type=int, default=48)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    setup = prepare(os.path.abspath(args.workdir), num_queries=args.num_queries)
    records = teacher_chaos(setup, args.kills, rng)
    phases = {}
    for r in records:
        phases[r["phase"]] = phases.get(r["phase"], 0) + 1
    student = student_chaos(setup, args.student_kills, rng)
    print(json.dumps({"teacher_kills": len(records), "landed_in": phases,
                      "retried": sum(r["retries"] for r in records), "student_kills": len(student),
                      "seconds": round(time.monotonic() - t0, 1), "ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
