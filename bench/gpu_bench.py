"""Teacher and student throughput on one GPU, for bench/gpu.sh: a mid-size random Idefics2 in bf16.

Built in memory (no checkpoint on disk, no network). The teacher pass is the stage's loop (prompts ->
encode -> forward under SpanCapture -> Item -> write_shard), timed against a bare forward of the same
batches; the student step is the stage's step (Student + MimIC heads, DeepSpeed when importable) on
targets streamed from that store. Prints tokens/s and model FLOPs utilisation (MFU).

Model FLOPs (stated, not measured): forward = 2·N_text·T + 2·L·d·T² (causal attention) + per image
2·N_vision·patches + 2·N_perceiver·latents; the student's backward through the frozen base computes
activation gradients only (no weight gradients): another 1× forward, so a student step = 2× forward.

    python bench/gpu_bench.py                 # on the GPU (via bench/gpu.sh)
    python bench/gpu_bench.py --tiny --device cpu --seconds 5   # smoke test of the script on a CPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def peak_tflops(device: str) -> float:
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"])
    if device != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))


def build(tiny: bool, device: str, dtype: torch.dtype):
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2ImageProcessorPil, Idefics2Processor

    from stages.models import LoadedModel, idefics2
    from stages.models.tiny import build_tokenizer
    tok = build_tokenizer()
    if tiny:
        text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8)
        n_latents, image_size = 4, 32
    else:  # ~1.0 B text parameters: Mistral-like hidden 2048, 16 layers, GQA 16/8, MLP 8192; SigLIP-base-like vision
        text = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=14)
        n_latents, image_size = 64, 224
    config = Idefics2Config(
        image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False, vision_config=vision,
        perceiver_config=dict(hidden_size=text["hidden_size"], rms_norm_eps=1e-5, resampler_n_latents=n_latents,
                              resampler_depth=3, resampler_n_heads=16, resampler_head_dim=96, num_key_value_heads=4),
        text_config=dict(model_type="mistral", vocab_size=len(tok), max_position_embeddings=32768, sliding_window=None,
                         pad_token_id=3, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5, **text))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = Idefics2ForConditionalGeneration(config)
    torch.set_default_dtype(default)
    model.eval().requires_grad_(False)
    processor = Idefics2Processor(image_processor=Idefics2ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": image_size, "shortest_edge": image_size}),
        tokenizer=tok, image_seq_len=n_latents)
    idefics2.prepare_processor(processor)
    return LoadedModel("idefics2", idefics2, model, processor, "gpu-bench-idefics2")


def forward_flops(lm, inputs) -> float:
    m, c = lm.model, lm.model.config.text_config
    n_text = sum(p.numel() for n, p in m.named_parameters() if "text_model" in n and "embed_tokens" not in n)
    n_vis = sum(p.numel() for n, p in m.named_parameters() if "vision_model" in n)
    n_per = sum(p.numel() for n, p in m.named_parameters() if "connector" in n)
    tokens_b = inputs["attention_mask"].sum(-1).double()
    flops = float((2 * n_text * tokens_b + 2 * c.num_hidden_layers * c.hidden_size * tokens_b ** 2).sum())
    if "pixel_values" in inputs:
        v = m.config.vision_config
        n_images = int(inputs["pixel_attention_mask"].flatten(2).any(-1).sum())
        patches = (v.image_size // v.patch_size) ** 2
        flops += n_images * (2 * n_vis * patches + 2 * n_per * m.config.perceiver_config.resampler_n_latents)
    return flops


def timed(fn, device: str, seconds: float, min_reps: int = 3) -> list[float]:
    """Repeat fn until `seconds` have passed (at least min_reps times); per-call wall times."""
    out, t_end = [], time.perf_counter() + seconds
    while len(out) < min_reps or time.perf_counter() < t_end:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0, help="timing budget per measurement")
    args = ap.parse_args()
    t_start = time.perf_counter()
    dtype = torch.bfloat16
    from pipeline.config import Config, StudentConfig, TaskConfig, TeacherConfig
    from stages.models.encode import encode, inputs_from_spans
    from stages.models.heads import attach, build_heads
    from stages.student import Student, losses
    from stages.tasks import get_task
    from stages.tasks.pools import training_queries
    from stages.tasks.prompts import build_prompt, reference_answer
    from stages.tasks.sampler import sample_icds
    from stages.tasks.synthetic import write_synthetic
    from stages.teacher import SpanCapture, fingerprint_fields
    from storage.manifest import Manifest, format_version
    from storage.reader import TargetReader
    from storage.writer import Item, open_for_write

    work = tempfile.mkdtemp(prefix="mimic-gpu-bench-")
    data_root = os.path.join(work, "data")
    write_synthetic(data_root, n_train=max(64, args.queries), n_val=8, seed=0)
    lm = build(args.tiny, args.device, dtype)
    print(f"model built in {time.perf_counter() - t_start:.0f} s: "
          f"{sum(p.numel() for p in lm.model.parameters()) / 1e9:.2f} B parameters, bf16, {args.device} "
          f"({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'})", flush=True)
    cfg = Config(task=TaskConfig(name="vqav2", root=data_root, num_queries=args.queries, support="train"),
                 teacher=TeacherConfig(shots=args.shots, batch_size=args.batch, shard_size=args.batch, store=os.path.join(work, "store")),
                 student=StudentConfig(global_batch=args.batch, micro_batch=args.batch))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="bfloat16"))
    t, tc = cfg.teacher, cfg.task
    task = get_task(tc.name)
    queries = training_queries(task, tc.root, tc.train_split, tc.num_queries, seed=tc.seed)
    support = task.load(tc.root, tc.train_split)
    by_id = {s.id: s for s in support}
    support_ids = [s.id for s in support]

    engine, how = lm.model, "plain model (deepspeed not importable)"
    try:
        import deepspeed
        engine = deepspeed.init_inference(lm.model, dtype=dtype, replace_with_kernel_inject=False)
        lm.model, how = engine.module, "deepspeed.init_inference"
    except ImportError:
        pass
    # -- teacher: the same batches, bare and through the stage's capture + store --------------------
    batches = []
    for b0 in range(0, len(queries), t.batch_size):
        qs = queries[b0:b0 + t.batch_size]
        icds = [sample_icds(support_ids, q.id, t.shots, seed=t.seed, view=0) for q in qs]
        prompts = [build_prompt(task.kind, "icl", q, [(by_id[i], reference_answer(by_id[i], tc.answer)) for i in ids],
                                answer=reference_answer(q, tc.answer)) for q, ids in zip(qs, icds)]
        enc = encode(lm, prompts)
        batches.append((b0 // t.batch_size, qs, icds, enc, {k: v.to(args.device) for k, v in enc.inputs.items()}))
    tokens = sum(int(b[3].inputs["attention_mask"].sum()) for b in batches)
    flops = sum(forward_flops(lm, b[4]) for b in batches)
    manifest = Manifest(format_version("bfloat16"), fingerprint_fields(cfg, lm, task.kind), tuple(q.id for q in queries), 1,
                        t.shard_size, lm.dims.n_layers, lm.dims.d_model, "bfloat16")
    layers = lm.adapter.decoder_layers(lm.model)

    def bare():
        for *_, inputs in batches:
            with torch.inference_mode():
                engine(**inputs)

    n_pass = [0]

    def teacher():
        store = os.path.join(work, f"store-{n_pass[0]}")
        n_pass[0] += 1
        capture = SpanCapture(layers, t.capture)
        writer = open_for_write(store, manifest)
        for shard, qs, icds, enc, inputs in batches:
            capture.keep = max(enc.span_lens)
            with torch.inference_mode():
                engine(**inputs)
            hidden_bkld = capture.stacked()
            items = [Item(q.id, 0, np.asarray(enc.span_ids[r], dtype=np.int32), hidden_bkld[r, -n:], tuple(ids))
                     for r, (q, ids, n) in enumerate(zip(qs, icds, enc.span_lens))]
            writer.write_shard(shard, items)
        for h in capture.handles:
            h.remove()
        return store

    peak = peak_tflops(args.device)
    bare(), teacher()  # warm-up
    t_bare = float(np.median(timed(bare, args.device, args.seconds)))
    t_teacher = float(np.median(timed(teacher, args.device, args.seconds)))
    store = teacher()
    prompt_len = tokens / len(queries)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "peak_bf16_tflops": peak,
              "teacher_engine": how, "shots": args.shots, "queries": args.queries, "batch": args.batch,
              "prompt_tokens_mean": prompt_len,
              "teacher_bare_tokens_per_s": tokens / t_bare, "teacher_tokens_per_s": tokens / t_teacher,
              "teacher_overhead": t_teacher / t_bare,
              "teacher_bare_mfu": flops / t_bare / (peak * 1e12), "teacher_mfu": flops / t_teacher / (peak * 1e12)}
    print(json.dumps(result), flush=True)

    # -- student: the stage's step on targets streamed from the store ------------------------------
    lm.model = lm.model if how.startswith("plain") else engine.module
    reader = TargetReader(store, seed=0, shuffle_buffer=64)
    heads = build_heads(lm.dims.n_layers, lm.dims.n_heads, lm.dims.head_dim).to(args.device)
    attach(lm, heads)
    model = Student(lm.model, heads, layers, t.capture)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=5e-3, weight_decay=1e-3)
    s_how = "plain torch AdamW"
    step_fn_engine = None
    try:
        import deepspeed

        from stages.student import _init_distributed, ds_config
        _init_distributed(1)
        step_fn_engine, optimizer, *_ = deepspeed.initialize(model=model, model_parameters=list(heads.parameters()),
                                                             optimizer=optimizer, config=ds_config(cfg.student, args.batch, 1, "bfloat16"))
        s_how = f"deepspeed.initialize, ZeRO {cfg.student.zero_stage}"
    except ImportError:
        pass
    items_iter = [iter(reader.epoch(0))]
    epoch = [0]
    s_tokens, s_flops = [], []

    def student_step():
        batch = []
        while len(batch) < args.batch:
            try:
                batch.append(next(items_iter[0]))
            except StopIteration:
                epoch[0] += 1
                items_iter[0] = iter(reader.epoch(epoch[0]))
        inputs = inputs_from_spans(lm, [it.token_ids.tolist() for it in batch], [[by_id[it.sample_id].load_image()] for it in batch])
        tt = inputs["input_ids"].shape[1]
        target = torch.zeros(len(batch), tt, lm.dims.n_layers, lm.dims.d_model, dtype=dtype)
        span_mask = torch.zeros(len(batch), tt)
        for b, it in enumerate(batch):
            n = it.hidden.shape[0]
            target[b, tt - n:] = it.hidden
            span_mask[b, tt - n:] = 1
        inputs = {k: v.to(args.device) for k, v in inputs.items()}
        s_tokens.append(int(inputs["attention_mask"].sum()))
        s_flops.append(2 * forward_flops(lm, inputs))
        run = step_fn_engine or model
        logits, hidden = run(**inputs)
        l_align, l_gt = losses(logits, hidden, target.to(args.device, hidden.dtype), span_mask.to(args.device),
                               inputs["attention_mask"], inputs["input_ids"])
        loss = l_align + 0.5 * l_gt
        if step_fn_engine is not None:
            step_fn_engine.backward(loss)
            step_fn_engine.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        student_step()
    s_tokens.clear(), s_flops.clear()
    times = timed(student_step, args.device, args.seconds, min_reps=5)
    step_s = float(np.median(times))
    result |= {"student_engine": s_how, "student_step_s": step_s,
               "student_tokens_per_s": float(np.mean(s_tokens)) / step_s,
               "student_mfu": float(np.mean(s_flops)) / step_s / (peak * 1e12), "total_s": time.perf_counter() - t_start}
    print(json.dumps(result), flush=True)
    print(f"\nteacher ({how}): bare {result['teacher_bare_tokens_per_s']:.0f} tokens/s (MFU {result['teacher_bare_mfu']:.1%}), "
          f"with capture + store {result['teacher_tokens_per_s']:.0f} tokens/s (MFU {result['teacher_mfu']:.1%}), "
          f"overhead {result['teacher_overhead']:.3f}x; {args.shots}-shot prompts of {prompt_len:.0f} tokens\n"
          f"student ({s_how}): {result['student_tokens_per_s']:.0f} tokens/s (MFU {result['student_mfu']:.1%}), "
          f"{step_s * 1000:.0f} ms per step of {args.batch}; total {result['total_s']:.0f} s")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
