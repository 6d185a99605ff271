"""The experiment config: one frozen dataclass per stage, every field documented, one validator.

A YAML or TOML file and `--set section.field=value` overrides pass through `load_config`; unknown
keys and wrong types are errors naming the key. The effective config is saved in each run directory.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field

import yaml

from stages.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""                 # checkpoint directory or hub id; "" = the embedded default (the toy ICL model)
    family: str = "auto"           # idefics | idefics2 | idefics3 | auto (read from config.json)
    dtype: str = "float32"         # weights and compute: float32 | bfloat16 | float16 | float64
    trust_remote_code: bool = False  # run Python code shipped with a hub checkpoint; only for checkpoints you trust


@dataclass(frozen=True)
class TaskConfig:
    name: str = "vqav2"            # vqav2 | okvqa | coco | hf-vqa | hf-caption | flickr30k | mme | seed-bench | mmmu-pro
    root: str = ""                 # data root (official files); "" = the embedded toy task (written on first use)
    train_split: str = "train"     # split the training queries and the support set come from
    eval_split: str = "val"        # split evaluation queries come from (never in a support set)
    query_split: str = ""          # split of the teacher's/student's queries; "" = train_split (val + support=train: a held-out store)
    num_queries: int = 0           # training queries N (the first N of the split shuffled by task.seed); 0 = all
                                   # (mme, seed-bench, mmmu-pro: N of their one labelled set, required; the rest is evaluated)
    seed: int = 3407               # shuffles each split before training/evaluation queries are taken (the authors' seed)
    answer: str = "most_common"    # target/ICD answer: most_common of the annotators | first (the authors' code)
    support: str = "queries"       # ICD pool: queries (the N training queries, as the authors) | train (whole split)


@dataclass(frozen=True)
class TeacherConfig:
    shots: int = 32                # k, in-context demonstrations per prompt
    views: int = 1                 # V independent ICD draws per query; the student uses view (epoch mod V)
    seed: int = 0                  # ICD sampler seed (with query id and view)
    sampler: str = "uniform"       # ICDs: uniform (the authors) | cover (one per reference answer, round after round)
    exclude_same_image: bool = False  # no ICD shows the query's picture; off = only the query itself is left out (the authors)
    store: str = ""                # store path or fsspec URL; "" = <run_dir>/store-<task>-<shots>shot
    capture: str = "ffn"           # what is stored per layer: ffn (MLP output) | attn (self-attention after o_proj)
    store_dtype: str = ""          # dtype of the stored targets: "" = model.dtype | float32 | bfloat16 | float16 | int8
                                   # (8-bit, a scale per token, layer and 128 values: 0.52 of bfloat16's bytes; PROTOCOL.md)
                                   # (e.g. bfloat16 targets from a float32 model: half the bytes, what real runs store)
    span: str = "all"              # stored span tokens: all (image tokens included, the authors) | text (~5x smaller for Idefics2)
    logits: str = "off"            # the next-token distributions at the answer positions, which LIVE trains on:
                                   # off | topk:K (the K largest logits, and the tail's mass) | full (the whole vocabulary)
    batch_size: int = 4            # prompts per forward
    shard_size: int = 16           # queries per shard (the unit of writing, publishing and resume)
    on_bad_sample: str = "fail"    # a query whose image cannot be loaded or whose prompt is refused: fail | skip
                                   # (skip records id and reason in its shard's marker; the student leaves it out)
    rank: int = -1                 # this process's rank; -1 = from the launcher's RANK
    world_size: int = -1           # number of ranks; -1 = from WORLD_SIZE (1 if unset)


@dataclass(frozen=True)
class StudentConfig:
    out: str = ""                  # run directory for checkpoints, log and artifact; "" = <run_dir>/student-<task>-<shots>shot
                                   # (the shots of the store it trains from), + -<method and options> unless plain MimIC
    method: str = "mimic"          # mimic | lora | lora-dagger (W_o of the LM only, r=1) | mimic+lora | live (METHOD.md §5)
                                   # | prompt-tuning | virtual-kv (teacher-free baselines, [compare])
    num_queries: int = 0           # train on the store's first N queries (a prefix of its shuffled query list); 0 = all
    shift: str = "mimic"           # MimIC heads (seed Tab. 8): mimic (SA + μ·v) | linear ((1−μ)·SA + μ·h(q), h linear)
                                   # | vector ((1−μ)·SA + μ·h, h a learnable vector)
    mu: str = "query"              # MimIC gate μ: query (per head, from q and log Z2) | shared (one per layer, across heads)
                                   # | constant (a learnable scalar per head, independent of the query)
    heads_from: str = ""           # heads directory to start the MimIC heads from (e.g. mimic+lora on trained heads); "" = fresh
    lr: float = 5e-3               # AdamW learning rate of MimIC heads (seed §7.2)
    lora_lr: float = 5e-4          # AdamW learning rate of LoRA weights (seed §7.2)
    prompt_lr: float = 3e-2        # AdamW learning rate of prompt tuning's virtual tokens (peft's prompt-tuning guide)
    weight_decay: float = 1e-3     # AdamW weight decay (seed Tab. 7)
    warmup_ratio: float = 0.1      # fraction of optimiser steps with linear warm-up, then cosine decay
    global_batch: int = 4          # sequences per optimiser step, whatever the world size
    micro_batch: int = 2           # sequences per forward on one rank
    epochs: int = 0                # 0 = 10 below 1000 training samples, else 5 (seed §7.2); 40 on the embedded default
    w_align: float = 1.0           # weight of L_align (MSE against the stored teacher outputs); unset, the method's
                                   # default (METHOD_DEFAULTS: 0 for the teacher-free methods)
    w_ce: float = 0.5              # weight of L_gt (language-model cross-entropy)
    ce_on: str = "all"             # L_gt on: all (every non-pad span token, the authors) | answer
    log_z2: str = "masked"         # masked (the derivation) | unmasked (the authors' code)
    zero_stage: int = 2            # DeepSpeed ZeRO stage 0-3
    clip: float = 1.0              # gradient clipping (global norm)
    save_every: int = 50           # optimiser steps between DeepSpeed checkpoints (and at the end)
    seed: int = 0                  # heads init and data order
    shuffle_buffer: int = 64       # items in the reader's shuffle buffer
    prefetch: int = 4              # micro-batches built ahead (images decoded, targets aligned) by a background thread
    prefetch_mb: int = 1024        # ... and at most this many MB of them (one is built whatever its size: 0 = one at a
                                   # time); neither changes what is trained (a real-width micro-batch of 2: ~170 MB)
    log: str = ""                  # also log the losses and lr per step: "" (losses.jsonl only) | tensorboard
                                   # (OUT/tensorboard; needs the optional tensorboard package: pip install -e ".[tensorboard]")


@dataclass(frozen=True)
class EvalConfig:
    mode: str = "zero-shot"        # zero-shot | icl | mimic | trained (the zero-shot prompt with any method's trained
                                   # artifact, eval.student) | align (L_align of the heads on teacher.store)
    shots: int = 4                 # k for icl
    heads: str = ""                # heads directory for mimic; "" = the student's default output
    student: str = ""              # a student's output directory for trained; "" = student.out
    num_samples: int = 0           # evaluation queries (the first of the eval split shuffled by task.seed); 0 = all
    batch_size: int = 8            # prompts per generate call
    num_beams: int = 3             # beam search width (METHOD.md §6)
    seed: int = 0                  # ICD sampler seed for icl
    sampler: str = "uniform"       # ICDs for icl: uniform | cover (as teacher.sampler)
    exclude_same_image: bool = False  # for icl, as teacher.exclude_same_image
    vqa_normalize_refs: bool = False  # VQA accuracy: answers normalised in full, like the prediction (then not the official score)
    unparsed: str = "wrong"        # multiple choice, a generation naming no option letter: wrong | random (a seeded letter, the authors)
    out: str = ""                  # run directory; "" = <run_dir>/eval-<mode>-<task>


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = "runs"          # parent of every default output path

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Per method, the student settings it takes where the config leaves them unset (an explicit value, even the
# dataclass default, wins): the teacher-free baselines train on L_gt alone, as their authors did ([compare]).
METHOD_DEFAULTS = {"prompt-tuning": {"w_align": 0.0}, "virtual-kv": {"w_align": 0.0}}

CHOICES = {
    ("model", "family"): ("auto", "idefics", "idefics2", "idefics3"),
    ("model", "dtype"): ("float32", "bfloat16", "float16", "float64"),
    ("task", "answer"): ("most_common", "first"),
    ("task", "support"): ("queries", "train"),
    ("teacher", "capture"): ("ffn", "attn"),
    ("teacher", "span"): ("all", "text"),
    ("teacher", "store_dtype"): ("", "float32", "bfloat16", "float16", "int8"),
    ("teacher", "sampler"): ("uniform", "cover"),
    ("teacher", "on_bad_sample"): ("fail", "skip"),
    ("student", "ce_on"): ("all", "answer"),
    ("student", "log_z2"): ("masked", "unmasked"),
    ("student", "method"): ("mimic", "lora", "lora-dagger", "mimic+lora", "live", "prompt-tuning", "virtual-kv"),
    ("student", "shift"): ("mimic", "linear", "vector"),
    ("student", "mu"): ("query", "shared", "constant"),
    ("student", "log"): ("", "tensorboard"),
    ("eval", "sampler"): ("uniform", "cover"),
    ("eval", "unparsed"): ("wrong", "random"),
    ("eval", "mode"): ("zero-shot", "icl", "mimic", "trained", "align"),
}


FLOAT32_MAX = 3.4028234663852886e38


def _coerce(where: str, value, typ):
    if typ is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 (PyYAML) reads 1e-2 as a string: it wants a dot in the mantissa
            value = float(value)
        except OverflowError:  # an int past the float range
            value = math.inf
        except ValueError:
            pass
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UserError(f"config {where}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    if typ is float and not math.isfinite(value):  # nan or inf would train NaN heads, or crash deep inside AdamW
        raise UserError(f"config {where}: expected a finite number, got {value}")
    if typ is float and abs(value) > FLOAT32_MAX:  # finite here, inf in the float32 maths it feeds (AdamW's lr)
        raise UserError(f"config {where}: expected a number within float32's range (±3.4e38), got {value}")
    return value


def _section(name: str, cls, values: dict):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise UserError(f"config: unknown key '{name}.{key}'; known keys: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()}
    for (section, key), allowed in CHOICES.items():
        if section == name and key in kwargs and kwargs[key] not in allowed:
            raise UserError(f"config {name}.{key}: {kwargs[key]!r} is not one of {', '.join(allowed)}")
    return cls(**kwargs)


def _check(cfg: Config) -> Config:
    t, s = cfg.teacher, cfg.student
    positive = {"teacher.views": t.views, "teacher.batch_size": t.batch_size, "teacher.shard_size": t.shard_size,
                "student.global_batch": s.global_batch, "student.micro_batch": s.micro_batch,
                "student.prefetch": s.prefetch,
                "eval.batch_size": cfg.eval.batch_size, "eval.num_beams": cfg.eval.num_beams}
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"config {key}: must be at least 1, got {value}")
    if t.shots < 1:
        raise UserError(f"config teacher.shots: must be at least 1 (the teacher runs k-shot ICL), got {t.shots}")
    if cfg.eval.shots < 0:
        raise UserError(f"config eval.shots: must be 0 or more, got {cfg.eval.shots}")
    non_negative = {"task.num_queries": cfg.task.num_queries, "eval.num_samples": cfg.eval.num_samples,
                    "task.seed": cfg.task.seed, "teacher.seed": t.seed, "student.seed": s.seed,
                    "eval.seed": cfg.eval.seed, "student.num_queries": s.num_queries,
                    "student.shuffle_buffer": s.shuffle_buffer, "student.prefetch_mb": s.prefetch_mb}
    for key, value in non_negative.items():
        if value < 0:
            raise UserError(f"config {key}: must be 0 or more, got {value}")
    if s.save_every < 1:
        raise UserError(f"config student.save_every: must be at least 1 (optimiser steps), got {s.save_every}")
    if "mimic" not in s.method and (s.shift != "mimic" or s.mu != "query" or s.heads_from):
        raise UserError(f"config student.shift, student.mu and student.heads_from are options of MimIC heads; "
                        f"student.method {s.method} has none (choose mimic or mimic+lora)")
    k = t.logits[5:] if t.logits.startswith("topk:") else ""
    if t.logits not in ("off", "full") and not (k.isdigit() and int(k) >= 1 and k == str(int(k))):
        raise UserError(f"config teacher.logits: {t.logits!r} is not one of off, topk:K (K >= 1, e.g. topk:64), full")
    if t.logits != "off" and t.store_dtype == "int8":
        raise UserError("config teacher.logits needs float targets: an int8 store holds no logits; "
                        "set teacher.store_dtype to bfloat16 (or float16, float32) for a store with logits")
    if not 0 <= s.zero_stage <= 3:
        raise UserError(f"config student.zero_stage: must be 0, 1, 2 or 3, got {s.zero_stage}")
    return cfg


def _read_file(fpath: str) -> dict:
    if not os.path.isfile(fpath):
        raise UserError(f"config file not found: {fpath}")
    try:
        with open(fpath, "rb") as f:
            data = tomllib.load(f) if fpath.endswith(".toml") else yaml.safe_load(f)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"config file {fpath} does not parse: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {fpath}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(fpath: str | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Defaults, then the file, then `section.key=value` overrides (values parsed as YAML scalars)."""
    data = _read_file(fpath) if fpath else {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}': expected section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        if key == "run_dir":
            data["run_dir"] = value
            continue
        if "." not in key:
            raise UserError(f"override '{item}': expected section.key=value")
        section, name = key.split(".", 1)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise UserError(f"config: '{section}' must be a mapping")
        data[section][name] = value
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    kwargs = {}
    for name, values in data.items():
        if name == "run_dir":
            kwargs["run_dir"] = _coerce("run_dir", values, str)
        elif name not in sections:
            raise UserError(f"config: unknown section '{name}'; known: {', '.join(sections)}")
        elif not isinstance(values, dict):
            raise UserError(f"config: section '{name}' must be a mapping, got {type(values).__name__}")
        else:
            kwargs[name] = _section(name, typing.get_type_hints(Config)[name], values)
    student = kwargs.get("student", StudentConfig())
    unset = {k: v for k, v in METHOD_DEFAULTS.get(student.method, {}).items() if k not in data.get("student", {})}
    kwargs["student"] = dataclasses.replace(student, **unset)
    return _check(Config(**kwargs))


def explicit_keys(fpath: str | None = None, overrides: typing.Iterable[str] = ()) -> frozenset[str]:
    """The `section.key` names that the file and the overrides set, whatever their values.

    A stage that takes settings from elsewhere (the student, from its store) takes those the user left
    unset and checks those the user set, even to their default value. Call after load_config, which
    refuses a bad file or override.
    """
    data = _read_file(fpath) if fpath else {}
    keys = {f"{section}.{key}" for section, values in data.items() if isinstance(values, dict) for key in values}
    return frozenset(keys | {item.split("=", 1)[0] for item in overrides})
