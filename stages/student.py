"""Stage two: train a method (MimIC heads by default) against a teacher store with DeepSpeed ZeRO (METHOD.md §4–5).

The student never builds a k-shot sequence: its input is [BOS] + the stored span ids with the
query's image, so its memory and step time do not depend on k. As torchtune's recipes, `run` is
setup (store, model with the method's parts, optimizer, resume), one training loop, and save; what
differs between methods (what they add, train and save, which losses they take) is in stages/methods.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from typing import TYPE_CHECKING

import torch

from stages.batches import batch_builder, epoch_batches, make_batch
from stages.card import write_card
from stages.dist import rank_and_world
from stages.errors import UserError
from stages.models import load_model
from stages.models.encode import tokenize
from stages.models.provenance import base_model
from stages.methods import METHODS, save_artifact
from stages.progress import progress
from stages.tasks import get_task
from stages.tasks.pools import query_split, training_queries
from stages.tasks.prompts import build_prompt
from stages.teacher import fingerprint_fields
from storage import layout
from storage.errors import StoreMismatch
from storage.reader import TargetReader, open_manifest

if TYPE_CHECKING:
    from pipeline.config import Config


class Student(torch.nn.Module):
    """The frozen base and the heads (or None: LoRA lives inside the base) in one module, so DeepSpeed sees
    every trained parameter as its own.

    forward returns the logits and each decoder layer's MLP (or attention) output, captured by hooks.
    """

    def __init__(self, base, heads, layers, capture: str):
        super().__init__()
        self.base, self.heads = base, heads
        self._outputs: list[torch.Tensor | None] = [None] * len(layers)
        self._hooks = [(layer.mlp if capture == "ffn" else layer.self_attn).register_forward_hook(
            lambda m, a, out, i=i: self._outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out))
            for i, layer in enumerate(layers)]

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()

    def forward(self, **inputs):
        logits = self.base(**inputs).logits
        return logits, torch.stack(self._outputs, dim=2)  # [b, t, l, d]


def losses(logits_btv, hidden_btld, target_btld, span_mask_bt, ce_mask_bt, input_ids_bt):
    """L_align: MSE over layers, span tokens and dims (position j against position j); L_gt: next-token CE."""
    n_values = span_mask_bt.sum() * hidden_btld.shape[2] * hidden_btld.shape[3]
    sq = (hidden_btld.float() - target_btld.float()).pow(2) * span_mask_bt[:, :, None, None]
    l_align = sq.sum() / n_values
    mask = ce_mask_bt[:, 1:].float()
    # Targets outside the mask are ignored, never looked up: there sit pads, BOS and prompt tuning's virtual ids
    # (past the vocabulary, stages/models/prompt.py).
    targets = input_ids_bt[:, 1:].masked_fill(mask == 0, -100)
    ce_bt = torch.nn.functional.cross_entropy(logits_btv[:, :-1].float().transpose(1, 2), targets, reduction="none")
    l_gt = (ce_bt * mask).sum() / mask.sum().clamp(min=1)
    return l_align, l_gt


def answer_start(lm, kind: str, query) -> int:
    """Index in the query's span (query + answer + EOS) of the answer's first token."""
    ids, start = tokenize(lm, build_prompt(kind, "mimic", query, [], load=lambda _: None))
    return len(ids) - start


def layer_mse(hidden_btld, target_btld, span_mask_bt) -> torch.Tensor:
    """L_align of each layer [l]: the MSE over span tokens and dims (their mean over layers is L_align)."""
    sq = (hidden_btld.float() - target_btld.float()).pow(2) * span_mask_bt[:, :, None, None]
    return sq.sum(dim=(0, 1, 3)) / (span_mask_bt.sum() * hidden_btld.shape[3])


@torch.no_grad()
def align_loss(lm, heads, items, images_of, capture: str = "ffn", batch_size: int = 4) -> dict:
    """Mean L_align (also per layer) and L_gt of the model with `heads` attached, over store items (e.g.
    held-out queries)."""
    model = Student(lm.model, heads, lm.adapter.decoder_layers(lm.model), capture)
    device = next(lm.model.parameters()).device
    sums, per_layer, n = torch.zeros(2), 0.0, 0
    for lo in range(0, len(items), batch_size):
        batch = items[lo: lo + batch_size]
        inputs, target, span_mask, ce_mask = make_batch(lm, batch, [[images_of(it.sample_id)] for it in batch],
                                                        device=device)
        logits, hidden = model(**inputs)
        l_align, l_gt = losses(logits, hidden, target, span_mask, ce_mask, inputs["input_ids"])
        sums += torch.tensor([l_align.item(), l_gt.item()]) * len(batch)
        per_layer = per_layer + layer_mse(hidden, target, span_mask).cpu().double() * len(batch)
        n += len(batch)
    model.remove_hooks()
    return {"l_align": (sums[0] / n).item(), "l_gt": (sums[1] / n).item(), "n": n,
            "l_align_per_layer": (per_layer / n).tolist()}


# The teacher's settings that a store records and the student takes from it (shots, sampler, seed, span,
# capture and exclude_same_image in its fingerprint, views in its manifest): they shape the targets, not
# what the student builds. Every other fingerprint field (model, dtype, prompt, task, split, task_seed,
# answer, support, ...) the student's own config determines, so the store must match it.
TEACHER_ONLY = ("shots", "sampler", "seed", "span", "capture", "exclude_same_image", "logits", "views")


def _mismatch(store: str, lines: list[str], shots: int, also: str = "") -> StoreMismatch:
    return StoreMismatch(f"store {store} does not match this student's config:", lines,
                         f"{also}make a matching store with `pipeline run teacher --shots {shots} --store NEW_PATH`"
                         " (same config), or point --store at one")


def follow_store(cfg: "Config", manifest, explicit: frozenset[str], store: str) -> "Config":
    """cfg reading `store`, with the teacher-only settings the store was made with.

    A teacher setting the user set (`explicit` names it, e.g. "teacher.shots") must agree with the
    store: else StoreMismatch, one line per field. A setting the store does not record is left as is.
    """
    fields = manifest.fingerprint_fields
    recorded = {"views": manifest.views, **{k: fields[k] for k in TEACHER_ONLY if k in fields}}
    mine = {k: getattr(cfg.teacher, k) for k in recorded if f"teacher.{k}" in explicit}
    views = mine.pop("views", manifest.views)
    if lines := manifest.diff(dataclasses.replace(manifest, views=views, fingerprint_fields={**fields, **mine})):
        unset = " ".join(f"teacher.{line.split(':')[0]}" for line in lines)
        raise _mismatch(store, lines, cfg.teacher.shots, f"leave {unset} unset to take the store's, ")
    return dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, store=store, **recorded))


def check_store(manifest, expected_fields: dict, query_ids: tuple[str, ...], store: str, shots: int):
    """Refuse a store made for another model, prompt, task, split, ... : one line per field. The teacher-only
    fields agree already where cfg came through follow_store (as from the `pipeline` command)."""
    wanted = dataclasses.replace(manifest, fingerprint_fields=expected_fields, query_ids=query_ids)
    lines = manifest.diff(wanted)
    if lines:
        raise _mismatch(store, lines, shots)


_PORT_OWNER = "MIMIC_MASTER_PORT_PID"  # the process that chose MASTER_PORT for its one-process group


def _init_distributed(rank: int, world: int):
    import deepspeed
    if world > 1:  # srun or an Indexed Job name the rank their own way; DeepSpeed reads RANK/WORLD_SIZE
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise UserError("a multi-rank student needs MASTER_ADDR and MASTER_PORT (torchrun and the deepspeed "
                            "launcher set them; with srun or a Kubernetes job, export them)")
    if world == 1:  # a plain `pipeline run student`: a one-process group on a free port
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        # A port this function chose in a parent process is held by the parent's group, and a child (a test's
        # subprocess, an experiment's worker) inherits the variable: choose again unless it is ours or a launcher's.
        if "MASTER_PORT" not in os.environ or os.environ.get(_PORT_OWNER, str(os.getpid())) != str(os.getpid()):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
            os.environ[_PORT_OWNER] = str(os.getpid())
    if not torch.cuda.is_available():
        # gloo does the collectives on CPU; skip the 30 s JIT build of the shm op (cpu_setup.md §3.1).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def _master_state(part) -> dict[str, torch.Tensor]:
    """A part's trainable parameters by name, as DeepSpeed's fp32 master weights: under bf16/fp16 the module
    holds a rounded copy. A collective under ZeRO: every rank takes part."""
    from deepspeed.utils import safe_get_full_fp32_param
    state = {}
    for name, p in part.named_parameters():
        if p.requires_grad:
            hp = safe_get_full_fp32_param(p)
            state[name] = (p if hp is None else hp).detach().float().cpu().clone()
    return state


def _schedule(optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, math.ceil(warmup_ratio * total_steps))

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epochs_for(s, n_items: int) -> int:
    """student.epochs, or when 0 the paper's rule: 10 epochs below 1000 training samples, else 5 (seed §7.2)."""
    return s.epochs or (10 if n_items < 1000 else 5)


def batch_split(global_batch: int, micro_batch: int, world: int) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) so that micro x accumulation x world = global_batch."""
    micro = min(micro_batch, max(1, global_batch // world))
    if global_batch % (micro * world):
        raise UserError(f"student.global_batch {global_batch} is not a multiple of micro_batch x world size "
                        f"({micro} x {world}); choose a global batch divisible by both")
    return micro, global_batch // (micro * world)


def ds_config(s, micro: int, accumulation: int, dtype: str, n_head_params: int = 0) -> dict:
    # ZeRO-3 would partition the heads' parameters, but the attention function reads them outside
    # any module DeepSpeed gathers for; they are tiny (0.26M for an 8B model), so keep them whole
    # and let ZeRO partition the optimizer state and gradients only.
    zero = {"stage": s.zero_stage, "stage3_param_persistence_threshold": max(n_head_params, 10**5)}
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
            "gradient_clipping": s.clip, "zero_optimization": zero,
            "bf16": {"enabled": dtype == "bfloat16"}, "fp16": {"enabled": dtype == "float16"},
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


# DeepSpeed's own `latest` is written in place (open 'w', then write), so a kill at that moment leaves it
# empty; this pointer to the last complete checkpoint is replaced atomically after each save.
COMPLETE = "last_complete"


def _save_checkpoint(engine, ckpt_dpath: str, step: int, client: dict, rank: int) -> None:
    tag = f"step{step}"
    engine.save_checkpoint(ckpt_dpath, tag=tag, client_state=client)
    if rank == 0:
        tmp = os.path.join(ckpt_dpath, COMPLETE + ".tmp")
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(ckpt_dpath, COMPLETE))


def _load_checkpoint(engine, ckpt_dpath: str, tag: str) -> dict:
    """engine.load_checkpoint, unpickling nothing but tensors and a few allow-listed DeepSpeed types.

    DeepSpeed's checkpoint engine calls torch.load(weights_only=False), which runs any code pickled into
    a checkpoint file; TORCH_FORCE_WEIGHTS_ONLY_LOAD makes torch use its weights-only unpickler anyway
    (torch/serialization.py). Returns the client state saved with the checkpoint.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            _, client = engine.load_checkpoint(ckpt_dpath, tag=tag)
    except Exception as e:  # UnpicklingError for a type other than tensors; others for a damaged checkpoint
        where = os.path.join(ckpt_dpath, tag)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if isinstance(e, torch.serialization.pickle.UnpicklingError):
            reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
            reason = reason.split(". Please")[0]  # not torch's advice to allow-list the type
            raise UserError(f"checkpoint {where} holds more than tensors, so it is not loaded (torch.load with "
                            f"weights_only=True: {reason}); delete {ckpt_dpath} to train from the start") from None
        raise UserError(f"checkpoint {where} cannot be loaded ({type(e).__name__}{': ' + lines[0] if lines else ''}); "
                        f"delete {ckpt_dpath} to train from the start") from None
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before
    if client is None:  # DeepSpeed warns and returns None when the tag's files are missing
        raise UserError(f"checkpoint directory {ckpt_dpath} names a checkpoint that is not there; "
                        f"delete {ckpt_dpath} to train from the start")
    return client


PART_NAMES = {"heads": "the heads'", "lora": "the LoRA", "live": "LIVE's", "prompt": "the prompt's",
              "virtual_kv": "the virtual keys' and values'"}


def _stop_if_not_finite(record: dict, parts: dict, step: int, ckpt_dpath: str, bar) -> None:
    """Stop before a NaN or inf reaches the log, a checkpoint or the trained weights, so the last checkpoint stays
    a good one.

    The losses are already summed over ranks and every rank holds the whole heads, so all ranks stop together.
    """
    bad = [f"{name} {value}" for name, value in record.items() if not math.isfinite(value)]
    broken = [name for name, part in parts.items()
              if not all(torch.isfinite(p).all() for p in part.parameters() if p.requires_grad)]
    if not bad and not broken:
        return
    what = (f"the loss is not finite ({', '.join(bad)})" if bad else
            f"{PART_NAMES[broken[0]]} weights are not finite after the update (loss {record['loss']:.4g})")
    pointer = os.path.join(ckpt_dpath, COMPLETE)
    kept = (f"the last good checkpoint ({open(pointer).read().strip()} in {ckpt_dpath}) is kept"
            if os.path.isfile(pointer) else "no checkpoint was saved")
    bar.close()  # ends the bar's line, so that the error starts a line of its own
    raise UserError(f"student stopped at step {step}: {what}; {kept}; lower student.lr, or check the store's targets")


def _tensorboard(out: str, step: int):
    """A TensorBoard writer into OUT/tensorboard; a resumed run hides the events it redoes (purge_step)."""
    from torch.utils.tensorboard import SummaryWriter  # the optional tensorboard package
    return SummaryWriter(os.path.join(out, "tensorboard"), purge_step=step or None)


def _setup_model(cfg: "Config", lm, method) -> tuple[dict, Student]:
    """The method's parts on the model (seeded: their initialisation), and the module DeepSpeed trains."""
    torch.manual_seed(cfg.student.seed)
    parts = method.add(lm, cfg.student)
    # A part outside the model (MimIC heads, LIVE's vectors, a prompt, virtual keys and values) is the Student's
    # submodule, so DeepSpeed trains it; LoRA lives inside the model.
    outside = next((part for part in parts.values() if part is not lm.model), None)
    return parts, Student(lm.model, outside, lm.adapter.decoder_layers(lm.model), cfg.teacher.capture)


def _setup_optimizer(cfg: "Config", model, groups: list[dict], total: int, micro: int, accumulation: int,
                     n_head_params: int):
    """DeepSpeed's engine over AdamW with the method's parameter groups (each with its lr), and the schedule."""
    import deepspeed
    s = cfg.student
    optimizer = torch.optim.AdamW(groups, weight_decay=s.weight_decay)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for g in groups for p in g["params"]], optimizer=optimizer,
        lr_scheduler=_schedule(optimizer, total, s.warmup_ratio),
        config=ds_config(s, micro, accumulation, cfg.model.dtype, n_head_params))
    return engine, scheduler


def run(cfg: "Config") -> str:
    s, tc = cfg.student, cfg.task
    rank, world = rank_and_world()
    micro, accumulation = batch_split(s.global_batch, s.micro_batch, world)
    task = get_task(tc.name)
    queries = training_queries(task, tc.root, query_split(tc), tc.num_queries, seed=tc.seed)
    by_id = {q.id: q for q in queries}
    if s.num_queries > len(queries):  # check_store below: the store holds these queries
        raise UserError(f"student.num_queries = {s.num_queries} but store {cfg.teacher.store} is for {len(queries)} "
                        f"queries (task.num_queries); train on at most {len(queries)}, or make a larger store")
    lm = load_model(cfg.model.path, cfg.model.family, cfg.model.dtype, cfg.model.trust_remote_code)
    check_store(open_manifest(cfg.teacher.store), fingerprint_fields(cfg, lm, task.kind), tuple(q.id for q in queries),
                cfg.teacher.store, cfg.teacher.shots)
    # Each rank reads only its own part of every global step (the same items whatever the world size), of the
    # store's first student.num_queries queries (the teacher drew their demonstrations from the whole pool).
    reader = TargetReader(cfg.teacher.store, seed=s.seed, shuffle_buffer=s.shuffle_buffer,
                          rank=rank, world_size=world, batch=s.global_batch, queries=s.num_queries or None)
    if "kl" in METHODS[s.method].LOSSES and layout.logits_setting(reader.manifest) is None:
        raise UserError(f"method {s.method} trains on the teacher's answer-token logits, and store {cfg.teacher.store} "
                        f"has none; make a store with them: `pipeline run teacher --shots {cfg.teacher.shots} "
                        "--store NEW_PATH --set teacher.logits=topk:64` (same config), and point --store at it")

    _init_distributed(rank, world)
    method = METHODS[s.method]
    parts, model = _setup_model(cfg, lm, method)
    groups = method.param_groups(parts, s)
    n_params = {name: sum(p.numel() for p in part.parameters() if p.requires_grad) for name, part in parts.items()}
    epochs = epochs_for(s, len(reader))
    steps_per_epoch = len(reader) // s.global_batch
    if steps_per_epoch == 0:
        raise UserError(f"the store holds {len(reader)} items, fewer than one global batch of {s.global_batch}")
    total = epochs * steps_per_epoch
    engine, scheduler = _setup_optimizer(cfg, model, groups, total, micro, accumulation,
                                         sum(n for name, n in n_params.items() if parts[name] is not lm.model))

    ckpt_dpath, log_fpath = os.path.join(s.out, "checkpoints"), os.path.join(s.out, "losses.jsonl")
    # What a resumed run must share with the run it continues (the data order and schedule depend on it); how far
    # ahead batches are built does not change them.
    unshared = ("out", "save_every", "log", "prefetch", "prefetch_mb")
    training = {k: v for k, v in dataclasses.asdict(s).items() if k not in unshared}
    os.makedirs(s.out, exist_ok=True)
    step = 0
    if os.path.isfile(os.path.join(ckpt_dpath, COMPLETE)):
        client = _load_checkpoint(engine, ckpt_dpath, open(os.path.join(ckpt_dpath, COMPLETE)).read().strip())
        changed = [f"{k}: checkpoint has {v!r}, config has {training[k]!r}"
                   for k, v in client.get("training", {}).items() if training.get(k) != v]
        if changed:
            raise UserError(f"cannot resume {ckpt_dpath} with another training config ({'; '.join(changed)}); "
                            f"restore it, or use a new student.out")
        reader.load_state_dict(client["reader"])
        step = client["step"]
        if rank == 0:
            epoch, done = divmod(step, steps_per_epoch)
            print(f"student: resuming from checkpoint after step {step} of {total} "
                  f"(epoch {epoch} continues at item {done * s.global_batch})")
        if rank == 0 and os.path.isfile(log_fpath):  # steps logged after that checkpoint are redone
            # A line cut short by a kill has no newline; the rewrite goes through a temporary file.
            rows = [line for line in open(log_fpath) if line.endswith("\n") and json.loads(line)["step"] <= step]
            with open(log_fpath + ".tmp", "w") as f:
                f.writelines(rows)
            os.replace(log_fpath + ".tmp", log_fpath)
    if rank == 0:
        with open(os.path.join(s.out, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        print(f"student: {sum(n_params.values()):,} trainable parameters ({s.method}: "
              f"{', '.join(f'{name} {n:,}' for name, n in n_params.items())}); {epochs} epochs x {steps_per_epoch} "
              f"steps, global batch {s.global_batch} = {micro} x {accumulation} accumulation x {world} ranks")
    # query id -> index in the span where the answer starts (for ce_on = answer)
    answer_starts = {q.id: answer_start(lm, task.kind, q) for q in queries} if s.ce_on == "answer" else {}

    weights = {"align": s.w_align, "gt": s.w_ce, "kl": 1.0}  # per loss the method takes
    logged = ("align", "gt", *(name for name in method.LOSSES if name not in ("align", "gt")))  # l_align, l_gt always
    log = open(log_fpath, "a") if rank == 0 else None
    tb = _tensorboard(s.out, step) if rank == 0 and s.log == "tensorboard" else None
    bar = progress(total=total, initial=step, desc="student", unit="step", disable=rank > 0)
    # Buffers: those waiting ready, the one being built, the loop's, and the one it has just let go of.
    build = batch_builder(lm, by_id, answer_starts, engine.device, keep=s.prefetch + 3)
    epoch, done = divmod(step, steps_per_epoch)
    with epoch_batches(reader, epoch, done, s, micro, build, engine.device, until=epochs) as batches:
        while step < total:
            epoch = step // steps_per_epoch
            torch.manual_seed(s.seed * 1_000_003 + step)  # LoRA's dropout masks: a resumed run draws the same ones
            sums = torch.zeros(1 + len(logged), device=engine.device)  # NCCL reduces only accelerator tensors
            wait_s = 0.0  # data wait: what the loop spent waiting for its micro-batches
            for _ in range(accumulation):
                mb = next(batches)
                wait_s += mb.wait_s
                inputs, target, span_mask, ce_mask = mb.to(engine.device)
                logits, hidden = engine(**inputs)
                l_align, l_gt = losses(logits, hidden, target.to(hidden.dtype), span_mask, ce_mask, inputs["input_ids"])
                terms = {"align": l_align, "gt": l_gt}
                if "kl" in method.LOSSES:
                    terms["kl"] = method.kl_loss(logits, mb.items)
                loss = sum(weights[name] * terms[name] for name in method.LOSSES)
                engine.backward(loss)
                engine.step()
                sums += torch.stack([loss.detach(), *(terms[name].detach() for name in logged)]).float()
            step += 1
            if world > 1:
                torch.distributed.all_reduce(sums)
            record = dict(zip(("loss", *(f"l_{name}" for name in logged)), (sums / (accumulation * world)).tolist()))
            _stop_if_not_finite(record, parts, step, ckpt_dpath, bar)
            if log:
                log.write(json.dumps({"step": step, "epoch": epoch, **record, "lr": scheduler.get_last_lr()[0],
                                      "data_wait_s": wait_s}) + "\n")
                log.flush()
            if tb:
                for name, value in {**record, "lr": scheduler.get_last_lr()[0]}.items():
                    tb.add_scalar(f"student/{name}", value, step)
            # refresh=False: update() draws the bar, postfix included, only as often as stages/progress.py allows
            bar.set_postfix(l_align=f"{record['l_align']:.4g}", l_gt=f"{record['l_gt']:.3g}",
                            wait=f"{wait_s * 1000:.0f}ms", refresh=False)
            bar.update(1)
            if step % s.save_every == 0 or step == total:
                _save_checkpoint(engine, ckpt_dpath, step, {"step": step, "reader": mb.reader_state,
                                                            "training": training}, rank)
    bar.close()
    if tb:
        tb.close()
    state = {name: _master_state(part) for name, part in parts.items()}  # a collective under ZeRO
    if rank == 0:
        save_artifact(s.method, parts, state, s.out, {"family": lm.family, "model": lm.identity()["name"],
                                                      "base_model": base_model(lm, cfg.model.path),
                                                      "train_queries": len(reader),
                                                      "store_fingerprint": reader.manifest.fingerprint})
        write_card(s.out)
        print(f"{s.method} written to {s.out} ({', '.join(parts)}), with its model card README.md")
    return s.out
