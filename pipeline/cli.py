"""The `pipeline` command: parse, configure, call a stage. Nothing else happens here."""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.path.exists("/dev/nvidia0") else "cuda")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import click

from pipeline.config import CHOICES, explicit_keys, load_config
from pipeline.defaults import follow_store, resolve
from stages.errors import UserError

CONFIG = click.option("--config", "config_fpath", type=click.Path(dir_okay=False), help="YAML or TOML experiment config.")
SET = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one config field (repeatable).")
DEBUG = click.option("--debug", is_flag=True, help="Show tracebacks.")
DRY_RUN = click.option("--dry-run", is_flag=True, help="Print the plan (ranks, shards, store, fingerprint, DeepSpeed); load no model.")


def _config(config_fpath, overrides, build_defaults=True, reads_store=lambda cfg: False, **named):
    """Config file, then --set, then the named options (those given). Where reads_store(cfg), the stage
    reads a teacher's store and takes the teacher settings from it (pipeline.defaults.follow_store)."""
    sets = [*overrides, *(f"{key}={value}" for key, value in named.items() if value is not None)]
    cfg = load_config(config_fpath, sets)
    if reads_store(cfg):
        cfg = follow_store(cfg, explicit_keys(config_fpath, sets))
    return resolve(cfg, build_defaults=build_defaults)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """MimIC as a two-stage pipeline: a k-shot ICL teacher writes targets, a student trains MimIC heads.

    \b
    With no config, every command runs on the embedded default (the toy ICL model and a held-out toy task):
      pipeline run all
    """


@cli.group()
def run():
    """Run a stage (teacher, student) or all of teacher -> student -> eval."""


@run.command("teacher")
@CONFIG
@SET
@click.option("--shots", type=int, help="k, demonstrations per prompt (teacher.shots).")
@click.option("--views", type=int, help="independent ICD draws per query (teacher.views).")
@click.option("--num-queries", type=int, help="training queries N (task.num_queries).")
@click.option("--store", help="store path or URL (teacher.store).")
@click.option("--capture", type=click.Choice(["ffn", "attn"]), help="what to store per layer (teacher.capture).")
@click.option("--rank", type=int, help="this job's rank, for independent jobs (teacher.rank).")
@click.option("--world-size", type=int, help="number of independent jobs (teacher.world_size).")
@click.option("--on-bad-sample", type=click.Choice(["fail", "skip"]),
              help="a query whose image cannot be loaded or whose prompt is refused: stop, or skip it and record why "
                   "(teacher.on_bad_sample).")
@DRY_RUN
@DEBUG
def run_teacher(config_fpath, overrides, shots, views, num_queries, store, capture, rank, world_size, on_bad_sample,
                dry_run, debug):
    """Run k-shot ICL on the frozen model and store each layer's outputs on the query + answer span.

    \b
    Example:
      pipeline run teacher --shots 32
      pipeline run teacher --config exp.yaml --rank 3 --world-size 8 --dry-run
      pipeline run teacher --on-bad-sample skip     # then `pipeline cache info STORE` lists what was skipped
    """
    cfg = _config(config_fpath, overrides, not dry_run, **{"teacher.shots": shots, "teacher.views": views,
                  "task.num_queries": num_queries, "teacher.store": store, "teacher.capture": capture,
                  "teacher.rank": rank, "teacher.world_size": world_size, "teacher.on_bad_sample": on_bad_sample})
    if dry_run:
        from stages.plan import teacher_plan
        return click.echo(json.dumps(teacher_plan(cfg), indent=2))
    from stages import teacher
    teacher.run(cfg)


@run.command("student")
@CONFIG
@SET
@click.option("--store", help="teacher store to train from (teacher.store).")
@click.option("--shots", type=int, help="without --store: train from store-<task>-<k>shot; with it: the k it must have "
              "been made with (teacher.shots; unset, the store's own).")
@click.option("--epochs", type=int, help="training epochs; 0 = the paper's rule (student.epochs).")
@click.option("--method", type=click.Choice(CHOICES["student", "method"]),
              help="what to train (student.method); its output is student-<task>-<k>shot-<method>.")
@click.option("--zero-stage", type=int, help="DeepSpeed ZeRO stage 0-3 (student.zero_stage).")
@DRY_RUN
@DEBUG
def run_student(config_fpath, overrides, store, shots, epochs, method, zero_stage, dry_run, debug):
    """Train MimIC heads (or another method, --method) against a teacher store with DeepSpeed ZeRO.

    The teacher's settings (shots, sampler, seed, views, span, capture) come from the store; one set
    explicitly must agree with it. The output is named after the store's shots.

    \b
    Example:
      pipeline run student
      pipeline run student --store runs/store-vqav2-32shot --zero-stage 3
      pipeline run student --method lora-dagger --set student.w_align=0     # LoRA† on L_gt alone
      pipeline run student --method virtual-kv --set student.num_queries=128   # the store's first 128 queries
      WORLD_SIZE=8 RANK=0 pipeline run student --dry-run   # the plan for 8 ranks
    """
    cfg = _config(config_fpath, overrides, not dry_run, reads_store=lambda cfg: True,
                  **{"teacher.store": store, "teacher.shots": shots, "student.epochs": epochs,
                     "student.method": method, "student.zero_stage": zero_stage})
    if dry_run:
        from stages.plan import student_plan
        return click.echo(json.dumps(student_plan(cfg), indent=2))
    from stages import student
    student.run(cfg)


@run.command("all")
@CONFIG
@SET
@click.option("--shots", type=int, help="k for the teacher (teacher.shots).")
@DEBUG
def run_all(config_fpath, overrides, shots, debug):
    """Teacher, then student, then zero-shot, k-shot ICL (the teacher's k) and evaluation of what the student
    trained (MimIC heads, or student.method's artifact).

    \b
    Example:
      pipeline run all               # the embedded default
      pipeline run all --shots 8 --config exp.yaml
    """
    from stages import evaluate, student, teacher
    cfg = _config(config_fpath, overrides, **{"teacher.shots": shots})
    teacher.run(cfg)
    student.run(cfg)
    scores = {}
    trained = "mimic" if cfg.student.method == "mimic" else "trained"  # --mode mimic reads MimIC heads only
    for mode in ("zero-shot", "icl", trained):
        metrics = evaluate.run(_config(config_fpath, overrides, **{"teacher.shots": shots, "eval.mode": mode,
                                                                   "eval.shots": cfg.teacher.shots}))
        click.echo(json.dumps(metrics))
        name = next(m for m in ("vqa_accuracy", "cider", "accuracy") if m in metrics)
        scores[mode] = metrics[name]
    click.echo(f"{name} on {metrics['n']} {cfg.task.name} queries: zero-shot {scores['zero-shot']:.1f}, "
               f"{cfg.teacher.shots}-shot ICL {scores['icl']:.1f}, "
               f"{'MimIC' if trained == 'mimic' else cfg.student.method} {scores[trained]:.1f}")


@cli.command("eval")
@CONFIG
@SET
@click.option("--mode", type=click.Choice(["zero-shot", "icl", "mimic", "trained", "align"]), help="eval.mode")
@click.option("--shots", type=int, help="k for icl (eval.shots).")
@click.option("--heads", help="heads directory for mimic (eval.heads).")
@click.option("--student", "student_dpath", help="for trained: a student's output directory, any method (eval.student).")
@click.option("--num-samples", type=int, help="evaluation queries; 0 = all (eval.num_samples).")
@click.option("--store", help="the teacher store (teacher.store): with --mode align, the one to measure L_align "
              "on; with mimic or align, the default --heads are those of the student trained from it.")
@DEBUG
def eval_cmd(config_fpath, overrides, mode, shots, heads, student_dpath, num_samples, store, debug):
    """Generate answers and score them (VQA accuracy or CIDEr); writes predictions.jsonl and metrics.json.

    --mode trained is the zero-shot prompt ([BOS] + query) with what a student trained, whatever its
    method (student.method: mimic, lora, lora-dagger, mimic+lora, live, prompt-tuning, virtual-kv); --mode mimic
    reads MimIC heads only.

    --mode align instead measures L_align of trained and of freshly initialised heads on a store,
    e.g. one of held-out queries.

    \b
    Example:
      pipeline eval --mode icl --shots 4
      pipeline eval --mode mimic --heads runs/student-vqav2-32shot/heads
      pipeline eval --mode mimic --store runs/store-vqav2-8shot    # the heads in runs/student-vqav2-8shot
      pipeline eval --mode trained --student runs/student-vqav2-8shot-lora
      pipeline eval --mode align --store runs/heldout-store --heads runs/student-vqav2-32shot/heads
    """
    from stages import evaluate
    cfg = _config(config_fpath, overrides, reads_store=lambda cfg: cfg.eval.mode in ("mimic", "trained", "align"),
                  **{"eval.mode": mode, "eval.shots": shots, "eval.heads": heads, "eval.student": student_dpath,
                     "eval.num_samples": num_samples, "teacher.store": store})
    metrics = evaluate.run(cfg)
    click.echo(json.dumps(metrics))
    click.echo(f"wrote {cfg.eval.out}/metrics.json")


@cli.group()
def analyze():
    """Analyses of trained students."""


@analyze.command("l2")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@SET
@click.option("--num-samples", type=int, help="held-out queries (eval.num_samples; unset: the first run's).")
@click.option("--out", "out_dpath", default="runs/analyze-l2", show_default=True, type=click.Path(file_okay=False))
@DEBUG
def analyze_l2(runs, overrides, num_samples, out_dpath, debug):
    """Seed Tab. 11: per decoder layer, the mean L2 distance between each run's latent and k-shot ICL's.

    The latent is the layer's output at the last prompt position (the one that gives the first answer token),
    on held-out queries: the zero-shot prompt with each run's artifact, and without one, against the k-shot ICL
    prompt on the frozen model (k = the runs' teacher shots). Settings come from the first run's config.json.
    Writes l2.md, l2.json and l2.png into --out.

    \b
    Example:
      pipeline analyze l2 runs/student-vqav2-8shot runs/student-vqav2-8shot-lora runs/student-vqav2-8shot-lora-dagger
    """
    from stages import analyze as an
    cfg = _config(os.path.join(runs[0], "config.json"), overrides, **{"eval.num_samples": num_samples})
    result = an.l2(cfg, list(runs), out_dpath)
    click.echo(an.table(result))
    click.echo(f"wrote {out_dpath}/l2.md, l2.json, l2.png")


@cli.command("report")
@click.argument("run_dpath", metavar="RUN_DIR", type=click.Path(exists=True, file_okay=False))
@DEBUG
def report_cmd(run_dpath, debug):
    """Plots and a short Markdown summary of what RUN_DIR holds, into RUN_DIR/report/: each student's L_align,
    L_gt and lr over steps; L_align per layer, fresh against trained heads, of each `eval --mode align`; the
    metric of every other evaluation.

    \b
    Example:
      pipeline report runs
    """
    from stages.report import report
    click.echo(f"wrote {report(run_dpath)} and its plots")


@cli.group()
def experiment():
    """Experiments that run every stage end to end."""


def _sizes(option: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        raise UserError(f"{option} takes comma-separated numbers of training queries, e.g. 16,32,128; got {text!r}")


@experiment.command("toy-icl")
@SET
@click.option("--family", type=click.Choice(["lookup", "attribute"]), default="lookup", show_default=True,
              help="lookup: the demonstrations say which word a colour stands for (a per-query lookup); attribute: "
                   "which attribute of the image the answer names (the same for every query).")
@click.option("--out", "out_dpath", type=click.Path(file_okay=False),
              help="experiment directory (data, stores, heads, evaluations, results)  [default: runs/toy-<family>]")
@click.option("--tasks", type=int,
              help="tasks 0..N-1: lookup, held-out permutation seeds; attribute, the 3 attributes in turn, "
                   "then again with the next data seed  [default: lookup 8, attribute 9]")
@click.option("--num-samples", type=int, default=64, show_default=True, help="test queries per task.")
@click.option("--sweep", default="16,32,128,1000", show_default=True,
              help="training-set sizes N of the sweep (comma-separated; '' for none).")
@click.option("--sweep-steps", type=int, default=1250, show_default=True,
              help="optimiser steps of every sweep student, whatever N (the paper's rule for N = 1000).")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="tasks run at once, each in its own process with its share of the cores.")
@DEBUG
def experiment_toy_icl(overrides, family, out_dpath, tasks, num_samples, sweep, sweep_steps, jobs, debug):
    """MimIC against zero-shot and k-shot ICL on a toy task family of the toy ICL model (issues 8 and 15).

    Per task: zero-shot and ICL (k = 1..32) evaluation, teachers at k = 8 and 16, and students
    with MSE + CE (CE on every span token, the authors' choice, and on the answer only), MSE only
    and CE only, each evaluated as MimIC; the MSE-only ceiling, measured by patching an after-SA
    teacher's outputs into the zero-shot model; and MSE + CE, MSE only and CE only at each
    training-set size N of the sweep, with the same number of optimiser steps. Writes results.md,
    results.json, accuracy_vs_k.png and accuracy_vs_n.png into --out. Rerunning the same command
    resumes; steps already done are kept.

    \b
    Example:
      pipeline experiment toy-icl --jobs 2 --set student.epochs=10   # the README's lookup table
      pipeline experiment toy-icl --family attribute --jobs 2 --set student.epochs=10
      pipeline experiment toy-icl --tasks 2 --num-samples 32 --sweep '' --out runs/toy-quick
    """
    from pipeline import experiment as exp
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1; got {num_samples}")
    sizes = _sizes("--sweep", sweep)
    out_dpath = out_dpath or f"runs/toy-{'icl' if family == 'lookup' else family}"
    tasks = exp.families()[family].default_tasks if tasks is None else tasks
    results = exp.run(out_dpath, family, list(range(tasks)), num_samples, tuple(overrides), log=click.echo, jobs=jobs,
                      sweep=sizes, sweep_steps=sweep_steps)
    click.echo(open(os.path.join(out_dpath, "results.md")).read())
    click.echo(f"wrote {out_dpath}/results.md, results.json and plots ({results['minutes']} min)")


@experiment.command("variants")
@SET
@click.option("--out", "out_dpath", default="runs/variants", show_default=True, type=click.Path(file_okay=False),
              help="experiment directory (store, students, evaluations, L2 analysis, results).")
@click.option("--family", type=click.Choice(["lookup", "attribute"]), default=None,
              help="run on a task of this toy family, with `experiment toy-icl`'s data and settings, instead of the "
                   "embedded default.")
@click.option("--task", "task", type=int, default=0, show_default=True, help="which task of --family.")
@DEBUG
def experiment_variants(overrides, out_dpath, family, task, debug):
    """The seed's Tab. 8, 11 and 12 from one 8-shot store: MimIC's shift and μ ablations, LoRA and LoRA† with and
    without L_align (with their L2 distance to 8-shot ICL), and MimIC + LoRA on top of the MimIC heads.

    On the embedded default unless --family or --set says otherwise. Writes results.md and results.json into
    --out; rerunning the same command resumes.

    \b
    Example:
      pipeline experiment variants
      pipeline experiment variants --family attribute --task 0 --set student.epochs=10   # the README's tables
      pipeline experiment variants --set task.num_queries=64 --set student.epochs=10 --set eval.num_samples=64
    """
    from pipeline import variants
    if task and not family:
        raise UserError("--task picks a task of --family; give --family lookup or attribute with it")
    results = variants.run(out_dpath, tuple(overrides), log=click.echo, family=family or "", task=task)
    click.echo(variants.markdown(results))
    click.echo(f"wrote {out_dpath}/results.md, results.json ({results['minutes']} min)")


@experiment.command("compare")
@SET
@click.option("--family", type=click.Choice(["lookup", "attribute"]), default="attribute", show_default=True,
              help="the toy task family (see `pipeline experiment toy-icl --help`).")
@click.option("--out", "out_dpath", type=click.Path(file_okay=False),
              help="experiment directory (data, stores, students, evaluations, results)  [default: runs/compare-<family>]")
@click.option("--tasks", type=int, default=4, show_default=True, help="tasks 0..N-1 of the family (the table's seeds).")
@click.option("--sizes", default="32,128,1000", show_default=True,
              help="training-set sizes N, each the store's first N queries (comma-separated).")
@click.option("--steps", type=int, default=1000, show_default=True, help="optimiser steps of every student, whatever N.")
@click.option("--methods", help="comma-separated, some of: mimic, mimic-ce, mse-only, live, lora, lora-dagger, "
              "mimic+lora, prompt-tuning, virtual-kv  [default: all]")
@click.option("--num-samples", type=int, default=64, show_default=True, help="test queries per task.")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="tasks run at once, each in its own process with its share of the cores.")
@DEBUG
def experiment_compare(overrides, family, out_dpath, tasks, sizes, steps, methods, num_samples, jobs, debug):
    """Is the teacher worth it? Zero-shot, k-shot ICL and every student method (MimIC, MimIC at w_align = 0, MSE
    only, LIVE, LoRA, LoRA†, MimIC + LoRA, prompt tuning, virtual-kv) at a few training-set sizes, from one
    teacher store per task (issue 20).

    Per task: one 8-shot teacher store of all training queries, with the answer-token distributions LIVE needs;
    zero-shot and 8-shot ICL evaluation; per size N and method, a student on the store's first N queries with the
    same number of optimiser steps whatever N, evaluated with the zero-shot prompt. Writes results.md (accuracy,
    trainable parameters, the student's and the teacher's time), results.json and accuracy_vs_n.png into --out.
    Rerunning the same command resumes; steps already done are kept.

    \b
    Example:
      pipeline experiment compare --jobs 2                 # the README's table
      pipeline experiment compare --family lookup --tasks 2 --sizes 32,128 --methods mimic,lora,virtual-kv
    """
    from pipeline import compare
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1; got {num_samples}")
    chosen = tuple(m.strip() for m in methods.split(",") if m.strip()) if methods is not None else tuple(compare.METHODS)
    out_dpath = out_dpath or f"runs/compare-{family}"
    results = compare.run(out_dpath, family, list(range(tasks)), num_samples, chosen, _sizes("--sizes", sizes),
                          steps, tuple(overrides), log=click.echo, jobs=jobs)
    click.echo(open(os.path.join(out_dpath, "results.md")).read())
    click.echo(f"wrote {out_dpath}/results.md, results.json and accuracy_vs_n.png ({results['minutes']} min)")


@cli.command("make-model")
@click.option("--family", type=click.Choice(["idefics", "idefics2", "idefics3"]), default="idefics2", show_default=True)
@click.option("--out", "out_dpath", required=True, type=click.Path(file_okay=False))
@click.option("--hidden", type=int, default=64, show_default=True, help="language model hidden size.")
@click.option("--layers", type=int, default=4, show_default=True, help="decoder layers.")
@click.option("--seed", type=int, default=0, show_default=True)
@DEBUG
def make_model_cmd(family, out_dpath, hidden, layers, seed, debug):
    """Write a small random-initialised checkpoint (config, weights, processor, tokenizer).

    \b
    Example:
      pipeline make-model --family idefics2 --out models/tiny-idefics2
    """
    from stages.models.tiny import make_model
    click.echo(make_model(family, out_dpath, seed=seed, hidden=hidden, layers=layers))


@cli.command("make-data")
@click.option("--out", "out_dpath", required=True, type=click.Path(file_okay=False))
@click.option("--n-train", type=int, default=64, show_default=True)
@click.option("--n-val", type=int, default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@DEBUG
def make_data_cmd(out_dpath, n_train, n_val, seed, debug):
    """Write a synthetic data set in the official VQAv2, OK-VQA, COCO Karpathy and HF formats, and in the
    Flickr30k, MME, SEED-Bench-2 and MMMU-Pro layouts (subfolders flickr30k/, mme/, seed_bench/, mmmu_pro/).

    \b
    Example:
      pipeline make-data --out data/synthetic
    """
    from stages.tasks.synthetic import write_synthetic
    write_synthetic(out_dpath, n_train=n_train, n_val=n_val, seed=seed)
    click.echo(out_dpath)


@cli.group()
def cache():
    """Inspect a teacher store."""


@cache.command("info")
@click.argument("path")
@DEBUG
def cache_info(path, debug):
    """What is in a store: queries, shards, size, bytes per value, fingerprint fields.

    \b
    Example:
      pipeline cache info runs/store-vqav2-32shot
    """
    from storage.inspection import info
    click.echo(json.dumps(info(path), indent=2))


@cache.command("verify")
@click.argument("path")
@DEBUG
def cache_verify(path, debug):
    """Check every shard: readable, shapes and offsets consistent, checksums matching.

    \b
    Example:
      pipeline cache verify runs/store-vqav2-32shot
    """
    from storage.inspection import verify
    problems = verify(path)
    for p in problems:
        click.echo(p, err=True)
    if problems:
        raise SystemExit(1)
    click.echo(f"{path}: ok")


@cache.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--dtype", required=True, type=click.Choice(["float32", "bfloat16", "float16", "int8"]),
              help="value dtype of the new store (int8: 8-bit with a scale per token and layer, PROTOCOL.md).")
@DEBUG
def cache_convert(src, dst, dtype, debug):
    """Write a copy of store SRC at DST with values in another dtype, without rerunning the teacher.

    From a float32 store the copy is bit for bit the store the teacher writes with teacher.store_dtype=DTYPE;
    from bfloat16 to int8 the values are rounded twice. Resumable: run it again to finish a killed conversion.

    \b
    Example:
      pipeline cache convert runs/store-vqav2-32shot runs/store-vqav2-32shot-int8 --dtype int8
    """
    from stages.progress import progress
    from storage.convert import convert
    fingerprint = convert(src, dst, dtype, lambda shards: progress(shards, desc="convert", unit="shard"))
    click.echo(f"{dst}: {dtype} (fingerprint {fingerprint[:12]})")


def main() -> None:
    from storage.errors import StoreError
    try:
        cli.main(standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except (UserError, StoreError) as e:
        if "--debug" in sys.argv:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
