"""The attribute family (issue 15): the demonstrations say which attribute the answer names.

Every image is read back by its pixels alone (where the square is, how big, what colour), independently
of the code that drew it; the training script's episodes ask one attribute each; the tokenizer
extension makes each answer one token without moving any old token.
"""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from stages.errors import UserError
from stages.models import LoadedModel, idefics2, load_model
from stages.tasks import get_task
from stages.tasks.toy_attribute import ANSWER_WORDS, ATTRIBUTES, TASKS, extend_tokenizer, write_toy_attribute
from stages.tasks.toy_icl import COLOURS, QUESTION, WORDS, build_model, build_tokenizer
from tests.test_toy_icl import _script



def read_attributes(pixels: np.ndarray) -> dict[str, str]:
    """The three attributes of a 16x16 image, from its pixels: the background is the median pixel (the square
    covers at most a quarter of the image); the square is every pixel far from it (each palette colour is at
    least 90 apart in L1 from any grey of 20..70 or 150..200); its size is counted more loosely (JPEG blurs edges)."""
    background = np.median(pixels.reshape(-1, 3), 0)
    distance = np.abs(pixels - background).sum(-1)
    rows, cols = np.nonzero(distance > 90)
    colour = int(np.argmin([np.abs(pixels[rows, cols].mean(0) - c).sum() for c in COLOURS]))
    large = (distance > 50).sum() > 36  # 64 or 16 pixels
    return {"colour": ATTRIBUTES["colour"][colour], "size": "large" if large else "small",
            "background": "light" if background.mean() > 110 else "dark"}


def test_every_task_loads_through_the_vqa_loader_and_answers_its_attribute(tmp_path):
    for task in TASKS:
        root = str(tmp_path / task)
        write_toy_attribute(root, task, n_train=24, n_val=8)
        write_toy_attribute(root, task, n_train=24, n_val=8)  # complete: a no-op
        train, val = (get_task("vqav2").load(root, split) for split in ("train", "val"))
        assert len(train) == 24 and len(val) == 8 and not {s.id for s in train} & {s.id for s in val}
        values = ATTRIBUTES[task]
        assert Counter(s.answers[0] for s in train) == Counter({v: 24 // len(values) for v in values})  # balanced
        seen = {other: set() for other in TASKS}
        for s in train + val:
            assert s.question == QUESTION and s.answers == (s.answers[0],) * 10
            read = read_attributes(np.asarray(s.load_image()))
            assert read[task] == s.answers[0], (task, read, s.answers[0])
            for other in TASKS:
                seen[other].add(read[other])
        # The other attributes vary: only the demonstrations can say which one is asked.
        assert all(len(seen[other]) >= 2 for other in TASKS if other != task), seen
    with pytest.raises(UserError, match="not this toy attribute set"):
        write_toy_attribute(str(tmp_path / "colour"), "size", n_train=24, n_val=8)
    with pytest.raises(UserError, match="unknown attribute task"):
        write_toy_attribute(str(tmp_path / "x"), "shape")


def test_extended_tokenizer_makes_each_answer_one_token_and_keeps_every_old_id():
    old = build_tokenizer()
    new = extend_tokenizer(old)
    for word in ANSWER_WORDS:
        ids = new(f" {word}", add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] >= len(old) and new.decode(ids) == f" {word}"
    text = ("Instruction: provide an answer to the question. Use the image to answer.\n"
            f"Image:<image> Question: {QUESTION} Answer: " + " ".join(WORDS) + "\n")
    assert new(text)["input_ids"] == old(text)["input_ids"]
    assert len(extend_tokenizer(new)) == len(new)  # already extended: unchanged


def _extended_lm():
    model, processor = build_model(0)
    processor.tokenizer = extend_tokenizer(processor.tokenizer)
    model.resize_token_embeddings(len(processor.tokenizer))
    idefics2.prepare_processor(processor)
    return LoadedModel("idefics2", idefics2, model, processor, "toy"), processor


def test_attribute_episodes_ask_one_attribute_and_answer_each_image_by_it():
    script = _script()
    lm, processor = _extended_lm()
    eps, pools = script.Episodes(lm), script.make_pools(processor, script.pool_images(2, seed=0))
    args = script.parse_args(["--batch", "8", "--k-max", "8", "--pool", "2", "--attr-frac", "1"])
    batch = script.train_batch(eps, pools, args, 3, None, frozenset())
    word_of = {token: word for word, token in eps.word_ids.items()}
    asked = Counter()
    for row, pixels in zip(batch["input_ids"], batch["pixel_values"]):  # pixels [n_items, 3, H, W], normalised
        words = [word_of[int(t)] for t in row[batch["targets"][: batch["n_answers"]]]]
        tasks = {task for task in TASKS if set(words) <= set(ATTRIBUTES[task])}
        assert len(tasks) == 1, words  # one attribute per episode
        task = tasks.pop()
        asked[task] += 1
        images = ((pixels.permute(0, 2, 3, 1) * 0.5 + 0.5) * 255).round().numpy()
        assert [read_attributes(im)[task] for im in images] == words
    assert len(asked) >= 2, asked  # the task is drawn per episode


def test_short_training_on_the_attribute_family_lowers_the_loss(tmp_path):
    script = _script()
    out, final = str(tmp_path / "run"), str(tmp_path / "model")
    script.main(["--out", out, "--final", final, "--steps", "30", "--batch", "4", "--k-max", "4", "--pool", "4",
                 "--warmup", "1", "--lr", "3e-3", "--eval-every", "1000", "--eval-episodes", "8", "--threads", "1",
                 "--attr-frac", "1"])
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    losses = {r["step"]: r["loss"] for r in log if "loss" in r}
    assert losses[30] < losses[1] - 0.5, losses
    lm = load_model(final)
    assert all(len(lm.tokenizer(f" {w}", add_special_tokens=False)["input_ids"]) == 1 for w in ANSWER_WORDS)
    assert log[-1]["final"] and {f"attr_k{k}" for k in (0, 1, 2, 4, 8, 16)} <= set(log[-1])
    assert lm.model.get_input_embeddings().num_embeddings == len(lm.tokenizer)


def test_committed_toy_model_learns_the_attribute_family_in_context(tmp_path):
    """The shipped model through `pipeline eval` machinery on every attribute task: 8 demonstrations lift VQA
    accuracy by at least 25 points over the zero-shot prompt, which cannot tell which attribute is asked."""
    from pipeline.config import load_config
    from pipeline.defaults import resolve
    from stages import evaluate
    from stages.tasks.toy_icl import model_dpath

    zero, icl = [], []
    for task in TASKS:
        data = str(tmp_path / task)
        write_toy_attribute(data, task, n_train=64, n_val=32)
        sets = [f"model.path={model_dpath()}", f"task.root={data}", f"run_dir={tmp_path / task}",
                "eval.num_samples=32"]
        zero.append(evaluate.run(resolve(load_config(None, [*sets, "eval.mode=zero-shot"])))["vqa_accuracy"])
        icl.append(evaluate.run(resolve(load_config(None, [*sets, "eval.mode=icl", "eval.shots=8"])))["vqa_accuracy"])
    assert np.mean(icl) >= np.mean(zero) + 25, (zero, icl)


def test_attribute_experiment_takes_each_querys_mean_over_its_views_as_the_ceiling(tmp_path):
    """On the attribute family a query is not determined by its answer, so the MSE-only optimum is the mean over
    each query's own demonstration draws (teacher.views = 8), not over the queries with its answer: the
    experiment measures the ceiling on such a store, once per query, with that mean patched in."""

    from pipeline import experiment, mse_ceiling
    from storage.reader import read_items

    out = str(tmp_path / "exp")
    results = experiment.run(out, "attribute", [1], 8, ("student.epochs=1", "task.num_queries=24",
                                                        "teacher.shard_size=8"), log=lambda *a: None, sweep=())
    row = results["per_task"][1]
    assert {"zero_shot", "icl", "mimic", "mse_only", "ce_only", "patched_ceiling"} <= set(row)
    assert results["labels"][1] == "size, seed 0" and "sweep" not in row
    measured = json.load(open(os.path.join(out, "attribute1", "ceiling-8shot", "ceiling.json")))
    assert measured["n"] == 24 and measured["views"] == 8 and measured["ceiling"] == row["patched_ceiling"][8]

    items = list(read_items(os.path.join(out, "attribute1", "store-attn-8shot")))
    assert len(items) == 24 * 8 and {it.view for it in items} == set(range(8))
    samples = {s.id: s for s in get_task("vqav2").load(os.path.join(out, "data", "attribute1"), "train")}
    answer_of = {it.sample_id: samples[it.sample_id].answers[0] for it in items}
    optimum = mse_ceiling.mse_optimum(items, answer_of, views=8)
    per_answer = mse_ceiling.mse_optimum(items, answer_of, views=1)
    for it in items[::8]:
        own = torch.stack([o.hidden.float() for o in items if o.sample_id == it.sample_id]).mean(0)
        same_answer = torch.stack([o.hidden.float() for o in items if answer_of[o.sample_id] == answer_of[it.sample_id]])
        assert torch.allclose(optimum(it), own, atol=1e-6)
        assert torch.allclose(per_answer(it), same_answer.mean(0), atol=1e-6)
        assert not torch.allclose(own, same_answer.mean(0), atol=1e-3)  # the two estimates differ here
