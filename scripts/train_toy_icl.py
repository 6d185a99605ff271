"""Pretrain a small Idefics2 from scratch until it learns the toy tasks in context (issues 8 and 15).

The committed model (stages/models/toy_icl, its training.json lists both phases) came from:

    nice -n 19 .venv/bin/python scripts/train_toy_icl.py --out toy_icl_run --final stages/models/toy_icl
    nice -n 5 .venv/bin/python scripts/train_toy_icl.py --out toy_icl_run2 --final stages/models/toy_icl \
        --init stages/models/toy_icl --lm-loss --bare-frac 0.5 --steps 450 --warmup 20 --lr 3e-4 \
        --eval-every 150 --max-minutes 14

The second phase makes the student's sequence ordinary for the model: next-token CE on the template
tokens too (MimIC's L_gt takes CE on every query token, METHOD.md §4), and half the batches start right
after BOS without the instruction, as [BOS] + query does. A third phase (--attr-frac) adds the attribute
family of stages/tasks/toy_attribute.py, where the demonstrations say which attribute the answer names:
it extends the tokenizer by that family's answer words (new embedding rows) and mixes its episodes in.

Each episode is the seed Tab. 6 prompt (instruction, then up to 32 demonstrations and a query, built by
stages.tasks.prompts.build_prompt and tokenized by stages.models.encode.tokenize) of one random
permutation task (stages/tasks/toy_icl.py) or, a fraction --attr-frac of them, of one attribute task;
CE on every answer token (and the token after it, "\\n" or EOS, so generation stops) trains every k at
once, since attention is causal. Two aids from
toy_icl_findings.md: the perceiver latents are re-initialised (in build_model) and a fraction of the
episodes use one fixed "anchor" task.

Deterministic: the batch of step s depends only on (seed, s). Resumable: a checkpoint (model, optimizer,
step, elapsed time, RNG state) is written every --ckpt-minutes; rerunning the same command continues.
Training stops at --steps or after --max-minutes of training in all, then saves the model in the
normal checkpoint format (save_pretrained + processor) to --final. Held-out accuracy at k = 0, 4, 8, 16
is logged to <out>/log.jsonl every --eval-every steps, and with the attribute family in the tokenizer
its accuracy at k = 0, 1, 2, 4, 8, 16 (attr_k*, every task alike).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from stages.models import LoadedModel, idefics2
from stages.models.encode import tokenize
from stages.tasks import toy_attribute as attr
from stages.tasks.prompts import VQA_INSTRUCTION, build_prompt
from stages.tasks.sample import Sample
from stages.tasks.toy_icl import (COLOURS, N_HELD_OUT, QUESTION, WORDS, anchor_permutation, build_model,
                                  draw_pixels, held_out_permutations, jpeg, permutation)

EVAL_KS = (0, 4, 8, 16)
ATTR_EVAL_KS = (0, 1, 2, 4, 8, 16)
N_COLOURS = len(COLOURS)
# Image classes of the pools: lookup colours first, then every attribute combination (toy_attribute).
ATTR_SHAPE = tuple(len(v) for v in attr.ATTRIBUTES.values())
N_CLASSES = N_COLOURS + math.prod(ATTR_SHAPE)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="toy_icl_run", help="checkpoint and log directory")
    p.add_argument("--final", default="stages/models/toy_icl", help="where the trained model is saved at the end")
    p.add_argument("--steps", type=int, default=3200, help="optimiser steps (the cosine schedule's length)")
    p.add_argument("--max-minutes", type=float, default=80.0, help="stop after this much training, all runs together")
    p.add_argument("--batch", type=int, default=16, help="episodes per step")
    p.add_argument("--k-max", type=int, default=32, help="demonstrations per training episode (before the query)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    p.add_argument("--anchor-frac", type=float, default=0.25, help="fraction of episodes on the fixed anchor task")
    p.add_argument("--cover-frac", type=float, default=0.5,
                   help="fraction of episodes whose colours come in shuffled rounds of all 8 (as `cover`)")
    p.add_argument("--pool", type=int, default=256, help="pre-drawn images per colour (training and eval pools apart)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    p.add_argument("--eval-episodes", type=int, default=256, help="held-out episodes per evaluation")
    p.add_argument("--ckpt-minutes", type=float, default=3.0, help="minutes between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: leave the other core to benchmarks)")
    p.add_argument("--init", default="", help="start from this saved model (a second phase) instead of random weights")
    p.add_argument("--lm-loss", action="store_true",
                   help="also train next-token CE on every other token (the template), as a language model would")
    p.add_argument("--bare-frac", type=float, default=0.0,
                   help="fraction of steps whose episodes start right after BOS, without the instruction "
                        "(the student's and MimIC evaluation's sequence, METHOD.md §4 and §6)")
    p.add_argument("--attr-frac", type=float, default=0.0,
                   help="fraction of episodes from the attribute family (stages/tasks/toy_attribute.py); "
                        "above 0 the tokenizer is extended by that family's answer words")
    return p.parse_args(argv)


# Arguments that change what is trained: a resumed run must have the same ones.
RESUME_KEYS = ("steps", "batch", "k_max", "lr", "warmup", "anchor_frac", "cover_frac", "pool", "seed",
               "init", "lm_loss", "bare_frac", "attr_frac")


def pool_images(n_per_class: int, seed: int) -> list[list[Image.Image]]:
    """[class][i]: images that take the data set's path (draw, JPEG, decode): training sees what the pipeline
    feeds. Classes 0..7 are the lookup family's colours, then the attribute family's combinations in
    np.ravel_multi_index order (attr_class)."""
    def decoded(pixels):
        return Image.open(io.BytesIO(jpeg(pixels))).convert("RGB")
    rng = np.random.default_rng([seed, 0x1AA6E])
    lookup = [[decoded(draw_pixels(c, rng)) for _ in range(n_per_class)] for c in range(N_COLOURS)]
    rng = np.random.default_rng([seed, 0xA77])  # its own stream: the lookup pools stay what they were
    combos = [np.unravel_index(i, ATTR_SHAPE) for i in range(N_CLASSES - N_COLOURS)]
    return lookup + [[decoded(attr.draw_object(tuple(map(int, v)), rng)) for _ in range(n_per_class)] for v in combos]


def attr_class(values) -> int:
    return N_COLOURS + int(np.ravel_multi_index(tuple(values), ATTR_SHAPE))


def make_pools(processor, images: list[list[Image.Image]]) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values [c, n, 3, H, W] and pixel_attention_mask [c, n, H, W], through the processor as the adapter does."""
    n_colours, n = len(images), len(images[0])
    out = processor.image_processor([[im] for row in images for im in row], return_tensors="pt")
    pixels = out["pixel_values"][:, 0].reshape(n_colours, n, *out["pixel_values"].shape[2:])
    mask = out["pixel_attention_mask"][:, 0].reshape(n_colours, n, *out["pixel_attention_mask"].shape[2:])
    return pixels, mask


class Episodes:
    """Token ids and targets of an episode, from the pipeline's prompt builder and tokenizer."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.word_ids = {}  # " word" -> its token, for every answer word that is one token
        for w in (*WORDS, *attr.ANSWER_WORDS):
            if len(ids := lm.tokenizer(f" {w}", add_special_tokens=False)["input_ids"]) == 1:
                self.word_ids[w] = ids[0]
        assert all(w in self.word_ids for w in WORDS)
        self.has_attributes = all(w in self.word_ids for w in attr.ANSWER_WORDS)  # after extend_tokenizer
        self.blank = Image.new("RGB", (1, 1))  # tokenize only needs to know where the images are
        self.n_instruction = len(lm.tokenizer(VQA_INSTRUCTION, add_special_tokens=False)["input_ids"])

    def ids(self, words: tuple[str, ...], bare: bool = False) -> tuple[list[int], list[int]]:
        """ids of the prompt whose items are answered by words (the last one the query, + EOS), and the
        positions of the answer tokens. bare: without the instruction, the first item right after BOS."""
        items = [Sample(str(i), "", QUESTION, (w,)) for i, w in enumerate(words)]
        prompt = build_prompt("vqa", "icl", items[-1], [(s, s.answers[0]) for s in items[:-1]],
                              answer=items[-1].answers[0], load=lambda s: self.blank)
        ids, _ = tokenize(self.lm, prompt)
        if bare:  # the instruction ends in a newline, a token boundary: the items' ids do not change
            ids = ids[:1] + ids[1 + self.n_instruction:]
        answer_ids = set(self.word_ids.values())
        where = [i for i, t in enumerate(ids) if t in answer_ids]
        assert [ids[i] for i in where] == [self.word_ids[w] for w in words], (len(where), len(words))
        return ids, where


def episode_values(rng: np.random.Generator, n_items: int, cover: bool, n_values: int = N_COLOURS) -> np.ndarray:
    if not cover:
        return rng.integers(0, n_values, n_items)
    rounds = [rng.permutation(n_values) for _ in range(math.ceil(n_items / n_values))]
    return np.concatenate(rounds)[:n_items]


def attribute_episode(rng: np.random.Generator, n_items: int, cover: bool, task: int | None = None):
    """An episode of one attribute task (random unless given): its answer words and image classes."""
    t = int(rng.integers(0, len(attr.TASKS))) if task is None else task
    values = [attr.random_values(rng, t, int(v)) for v in episode_values(rng, n_items, cover, ATTR_SHAPE[t])]
    return tuple(attr.answer(t, v) for v in values), np.array([attr_class(v) for v in values])


def make_batch(eps: Episodes, pools, words: list[tuple[str, ...]], classes: np.ndarray, image_idx: np.ndarray,
               bare: bool = False) -> dict:
    """Model inputs [b, t] and targets for episodes of equal length (every item has the same token count):
    episode e's items are answered words[e] and show image image_idx[e, i] of pool class classes[e, i]."""
    pixels, mask = pools
    rows, where = [], None
    for episode in words:
        ids, where = eps.ids(episode, bare)
        rows.append(ids)
    input_ids = torch.tensor(rows)  # [b, t]
    targets = torch.tensor(where + [w + 1 for w in where])  # answer tokens and the token after each
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixels[classes, image_idx],               # [b, n_items, 3, H, W]
            "pixel_attention_mask": mask[classes, image_idx],         # [b, n_items, H, W]
            "targets": targets, "n_answers": len(where)}


def train_batch(eps, pools, args, step: int, anchor, held_out) -> dict:
    rng = np.random.default_rng([args.seed, 7, step])
    attr_rng = np.random.default_rng([args.seed, 9, step])  # its own stream: lookup episodes stay what they were
    n_items = args.k_max + 1
    words, classes = [], []
    for _ in range(args.batch):
        if rng.random() < args.anchor_frac:
            perm = anchor
        else:
            while (perm := tuple(int(i) for i in rng.permutation(N_COLOURS))) in held_out:
                pass
        colours = episode_values(rng, n_items, rng.random() < args.cover_frac)
        if attr_rng.random() < args.attr_frac:
            episode_words, episode_classes = attribute_episode(attr_rng, n_items, attr_rng.random() < args.cover_frac)
        else:
            episode_words, episode_classes = tuple(WORDS[perm[c]] for c in colours), colours
        words.append(episode_words)
        classes.append(episode_classes)
    # Its own stream, so that the first phase's batches stay what they were.
    bare = np.random.default_rng([args.seed, 8, step]).random() < args.bare_frac
    return make_batch(eps, pools, words, np.stack(classes), rng.integers(0, args.pool, (args.batch, n_items)), bare)


def loss_of(model, batch, lm_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE over answer tokens and following tokens (+ with lm_loss, the mean CE over every other
    token), and the CE over answer tokens alone."""
    targets = batch["targets"]
    input_ids = batch["input_ids"]
    inputs = {k: v for k, v in batch.items() if k not in ("targets", "n_answers")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**inputs, logits_to_keep=0 if lm_loss else targets - 1).logits.float()  # [b, t | n_targets, v]
    if lm_loss:
        ce_all = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
        ce = ce_all[:, targets - 1]
        rest = torch.ones(ce_all.shape[1], dtype=torch.bool)
        rest[targets - 1] = False
        return ce.mean() + ce_all[:, rest].mean(), ce[:, : batch["n_answers"]].mean().detach()
    labels = input_ids[:, targets]  # [b, n_targets]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    return ce.mean(), ce[:, : batch["n_answers"]].mean().detach()


@torch.no_grad()
def query_accuracy(model, eps, pools, words, classes, image_idx) -> float:
    """Accuracy (full-vocab argmax) on the last item's answer of every episode."""
    correct = 0
    for lo in range(0, len(words), 64):
        batch = make_batch(eps, pools, words[lo:lo + 64], classes[lo:lo + 64], image_idx[lo:lo + 64])
        q = batch["targets"][batch["n_answers"] - 1: batch["n_answers"]]
        inputs = {k: v for k, v in batch.items() if k not in ("targets", "n_answers")}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**inputs, logits_to_keep=q - 1).logits[:, 0]  # [b, vocab]
        correct += (logits.argmax(-1) == batch["input_ids"][:, q[0]]).sum().item()
    return correct / len(words)


@torch.no_grad()
def evaluate(model, eps, pools, n_episodes: int) -> dict:
    """Held-out accuracy: on held-out permutations (k*), cover-ordered demos and a query of a uniform colour;
    with the attribute family (attr_k*), fresh images, each task alike, cover-ordered demos."""
    rng = np.random.default_rng([12345, 0])
    perms = [permutation(i % N_HELD_OUT) for i in range(n_episodes)]
    demo_cols = np.stack([episode_values(rng, max(EVAL_KS), True) for _ in range(n_episodes)])
    query_col = rng.integers(0, N_COLOURS, (n_episodes, 1))
    idx = rng.integers(0, pools[0].shape[1], (n_episodes, max(EVAL_KS) + 1))
    model.eval()
    out = {}
    for k in EVAL_KS:
        cols = np.concatenate([demo_cols[:, :k], query_col], 1)
        words = [tuple(WORDS[perm[c]] for c in row) for perm, row in zip(perms, cols)]
        out[f"k{k}"] = query_accuracy(model, eps, pools, words, cols, np.concatenate([idx[:, :k], idx[:, -1:]], 1))
    if eps.has_attributes:
        rng = np.random.default_rng([12345, 1])
        n_items = max(ATTR_EVAL_KS) + 1
        episodes = [attribute_episode(rng, n_items, True, task=i % len(attr.TASKS)) for i in range(n_episodes)]
        idx = rng.integers(0, pools[0].shape[1], (n_episodes, n_items))
        for k in ATTR_EVAL_KS:
            keep = [*range(k), n_items - 1]  # the first k as demonstrations, the last as the query
            out[f"attr_k{k}"] = query_accuracy(model, eps, pools, [tuple(w[i] for i in keep) for w, _ in episodes],
                                               np.stack([c[keep] for _, c in episodes]), idx[:, keep])
    model.train()
    return out


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(fpath: str, model, opt, step: int, elapsed_s: float, args) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "elapsed_s": elapsed_s,
             "torch_rng": torch.get_rng_state(), "args": {k: getattr(args, k) for k in RESUME_KEYS}}
    torch.save(state, fpath + ".tmp")
    os.replace(fpath + ".tmp", fpath)  # a kill mid-save leaves the previous checkpoint intact


def save_final(model, processor, dpath: str, summary: dict) -> None:
    parent = os.path.dirname(os.path.abspath(dpath))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-model-", dir=parent)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "training.json"), "w") as f:
        json.dump(summary, f, indent=2)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model ships to every user (and the Docker image)
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o644)
    if os.path.exists(dpath):
        shutil.rmtree(dpath)
    os.replace(tmp, dpath)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    ckpt_fpath, log_fpath = os.path.join(args.out, "checkpoint.pt"), os.path.join(args.out, "log.jsonl")

    previous = []  # the phases the --init model went through
    if not args.init:
        model, processor = build_model(args.seed)
    else:
        from transformers import AutoProcessor, Idefics2ForConditionalGeneration
        torch.manual_seed(args.seed)  # as build_model does, so the RNG state does not depend on the phase
        model = Idefics2ForConditionalGeneration.from_pretrained(args.init)
        model.set_attn_implementation("sdpa")
        processor = AutoProcessor.from_pretrained(args.init)
        with open(os.path.join(args.init, "training.json")) as f:
            summary = json.load(f)
        previous = summary.get("phases", [summary])
    if args.attr_frac > 0:  # new tokens, new embedding rows (mean-initialised, drawn from the seeded RNG)
        processor.tokenizer = attr.extend_tokenizer(processor.tokenizer)
        if model.get_input_embeddings().num_embeddings < len(processor.tokenizer):
            model.resize_token_embeddings(len(processor.tokenizer))
    idefics2.prepare_processor(processor)
    lm = LoadedModel("idefics2", idefics2, model, processor, args.final)
    eps = Episodes(lm)
    train_pools = make_pools(processor, pool_images(args.pool, args.seed))
    eval_pools = make_pools(processor, pool_images(args.pool, args.seed + 1))
    anchor, held_out = anchor_permutation(), held_out_permutations()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    step, elapsed_s = 0, 0.0
    if os.path.isfile(ckpt_fpath):
        state = torch.load(ckpt_fpath, weights_only=True)  # our own checkpoint, but never unpickle more than tensors
        differ = {k: (v, getattr(args, k)) for k, v in state["args"].items() if getattr(args, k) != v}
        if differ:
            raise SystemExit(f"{ckpt_fpath} was made with other settings {differ} (checkpoint, now); "
                             f"use the same ones or another --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step, elapsed_s = state["step"], state["elapsed_s"]
        print(f"resumed at step {step} after {elapsed_s / 60:.1f} min")
    model.train()

    t_start, t_ckpt, log = time.monotonic() - elapsed_s, time.monotonic(), open(log_fpath, "a")
    while step < args.steps and time.monotonic() - t_start < args.max_minutes * 60:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss, answer_ce = loss_of(model, train_batch(eps, train_pools, args, step, anchor, held_out), args.lm_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        record = {"step": step, "min": round((time.monotonic() - t_start) / 60, 2), "loss": round(loss.item(), 4),
                  "answer_ce": round(answer_ce.item(), 4), "lr": lr_at(step - 1, args)}
        if step % args.eval_every == 0:
            record |= evaluate(model, eps, eval_pools, args.eval_episodes)
        if step % 10 == 0 or step == 1 or "k0" in record:
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
        if time.monotonic() - t_ckpt > args.ckpt_minutes * 60:
            save_checkpoint(ckpt_fpath, model, opt, step, time.monotonic() - t_start, args)
            t_ckpt = time.monotonic()
    save_checkpoint(ckpt_fpath, model, opt, step, time.monotonic() - t_start, args)
    final = evaluate(model, eps, eval_pools, args.eval_episodes)
    record = {"step": step, "min": round((time.monotonic() - t_start) / 60, 2), "final": True, **final}
    log.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    phases = previous + [{"steps": step, "minutes": record["min"], "held_out_accuracy": final, "args": vars(args)}]
    save_final(model, processor, args.final, {"minutes": round(sum(p["minutes"] for p in phases), 2),
                                              "held_out_accuracy": final, "phases": phases})
    print(f"saved the trained model to {args.final}")


if __name__ == "__main__":
    main()
