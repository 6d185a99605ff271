"""k-shot prompts (METHOD.md §3): exactly k demonstrations, never the query, deterministic in (seed, query, view);
and `encode` gives exactly what each family's official processor gives for the same pieces."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from stages.errors import UserError
from stages.models import load_model
from stages.models.encode import encode, tokenize
from stages.tasks.prompts import build_prompt
from stages.tasks.sample import Sample
from stages.tasks.sampler import sample_icds
from tests.conftest import FAMILIES, random_image

# Question texts are unique and none is a substring of another ("shape 1?" is not in "shape 10?").
SAMPLES = [Sample(str(1000 + i), b"", f"what colour is shape {i}?", (f"colour{i}",) * 10) for i in range(20)]
BY_ID = {s.id: s for s in SAMPLES}
SUPPORT_IDS = [s.id for s in SAMPLES]
IMAGES = {s.id: random_image(i) for i, s in enumerate(SAMPLES)}


def _load(sample):
    return IMAGES[sample.id]


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request, model_dirs):
    return load_model(model_dirs[request.param])


def _icl_prompt(query, k, *, seed=0, view=0, answer=None):
    icd_ids = sample_icds(SUPPORT_IDS, query.id, k, seed=seed, view=view)
    icds = [(BY_ID[i], BY_ID[i].answers[0]) for i in icd_ids]
    return build_prompt("vqa", "icl", query, icds, answer=answer, load=_load), icd_ids


def _image_tokens_per_image(lm):
    # Idefics marks an image with one <image> token; Idefics2 stands it for image_seq_len of them.
    return 1 if lm.family == "idefics" else lm.processor.image_seq_len


def _decode(lm, ids):
    return lm.tokenizer.decode(ids, skip_special_tokens=False)


# --- k-shot prompts ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1, 4])
def test_k_shot_prompt_holds_exactly_k_demonstrations_and_the_query_once(lm, k):
    query = SAMPLES[7]
    prompt, icd_ids = _icl_prompt(query, k)
    assert query.id not in icd_ids and len(set(icd_ids)) == k

    # The pieces: k images in the context, one in the query.
    assert sum(isinstance(p, Image.Image) for p in prompt.context) == k
    assert sum(isinstance(p, Image.Image) for p in prompt.query) == 1

    # What the model sees: k + 1 images' worth of image tokens and pixel rows, k + 1 questions.
    enc = encode(lm, [prompt])
    ids = enc.inputs["input_ids"][0].tolist()
    image_id = lm.tokenizer.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == (k + 1) * _image_tokens_per_image(lm)
    assert enc.inputs["pixel_values"].shape[1] == k + 1
    text = _decode(lm, ids)
    assert text.count("Question:") == k + 1
    assert text.count("Answer:") == k + 1
    for i in icd_ids:
        assert text.count(BY_ID[i].question) == 1
        assert f"{BY_ID[i].question} Answer: {BY_ID[i].answers[0]}" in text

    # The query's question appears once, in the query span and not in the context.
    all_ids, start = tokenize(lm, prompt)
    assert all_ids == ids  # one row, no padding
    assert text.count(query.question) == 1
    assert query.question not in _decode(lm, all_ids[:start])
    span = _decode(lm, all_ids[start:])
    assert span.count(query.question) == 1 and span.count("Question:") == 1
    assert span.rstrip().endswith("Answer:")


def test_same_seed_gives_the_same_prompt_and_other_views_or_seeds_differ(lm):
    query = SAMPLES[3]

    def ids(seed, view):
        prompt, _ = _icl_prompt(query, 4, seed=seed, view=view)
        return encode(lm, [prompt]).inputs["input_ids"][0].tolist()

    reference = ids(0, 0)
    assert ids(0, 0) == reference
    others = [ids(0, 1), ids(0, 2), ids(1, 0), ids(2, 0)]
    for other in others:
        assert other != reference
    assert len({tuple(x) for x in [reference, *others]}) == 5


# --- the sampler ---------------------------------------------------------------------------------------------------

support_and_query = st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=30, unique=True).flatmap(
    lambda ids: st.tuples(st.just(ids), st.one_of(st.sampled_from(ids), st.just("not-in-support"))))


@given(support_and_query, st.data(), st.integers(0, 2**32), st.integers(0, 64))
@settings(max_examples=200, deadline=None)
def test_sample_icds_draws_k_distinct_support_ids_never_the_query(support_query, data, seed, view):
    support, query = support_query
    n_available = len(support) - (query in support)
    k = data.draw(st.integers(0, n_available))
    picks = sample_icds(support, query, k, seed=seed, view=view)
    assert len(picks) == k
    assert len(set(picks)) == k
    assert query not in picks
    assert set(picks) <= set(support)
    assert sample_icds(support, query, k, seed=seed, view=view) == picks  # deterministic
    if k == n_available:
        assert set(picks) == set(support) - {query}


@given(support_and_query, st.integers(1, 5))
def test_sample_icds_refuses_more_shots_than_the_support_offers(support_query, extra):
    support, query = support_query
    n_available = len(support) - (query in support)
    with pytest.raises(UserError, match=f"offers {n_available} besides the query"):
        sample_icds(support, query, n_available + extra, seed=0, view=0)
    with pytest.raises(UserError):
        sample_icds(support, query, -extra, seed=0, view=0)


def test_sample_icds_refuses_when_only_the_query_is_left():
    assert sample_icds(["a", "b"], "a", 1, seed=0, view=0) == ["b"]
    with pytest.raises(UserError):
        sample_icds(["a", "b"], "a", 2, seed=0, view=0)


def test_sample_icds_covers_the_support_set_about_uniformly():
    support = [f"id{i}" for i in range(10)]
    n_draws, k = 1500, 3
    counts = Counter()
    for view in range(n_draws):
        counts.update(sample_icds(support, "id4", k, seed=0, view=view))
    assert set(counts) == set(support) - {"id4"}
    expected = n_draws * k / 9  # 500 per id
    assert all(abs(c - expected) < 0.2 * expected for c in counts.values()), counts
    # Different queries get different demonstrations for the same (seed, view).
    draws = {tuple(sample_icds(support, q, k, seed=0, view=0)) for q in support}
    assert len(draws) > 5


# --- encode matches the official processors ------------------------------------------------------------------------

def test_encode_matches_the_official_processor(lm):
    # Different k so that the batch is padded; no answers (what evaluation encodes).
    prompts = [_icl_prompt(SAMPLES[0], 1)[0], _icl_prompt(SAMPLES[1], 3)[0]]
    ours = encode(lm, prompts).inputs
    pieces = [p.context + p.query for p in prompts]
    if lm.family in ("idefics2", "idefics3"):  # text with "<image>" placeholders, images alongside
        texts = ["<s>" + "".join(p if isinstance(p, str) else "<image>" for p in ps) for ps in pieces]
        images = [[p for p in ps if isinstance(p, Image.Image)] for ps in pieces]
        ref = lm.processor(text=texts, images=images, padding=True, add_special_tokens=False, return_tensors="pt")
        image_mask = "pixel_attention_mask"
    else:
        ref = lm.processor(text=[list(ps) for ps in pieces], padding=True, add_special_tokens=False,
                           add_eos_token=False, return_tensors="pt")
        image_mask = "image_attention_mask"
    assert not ours["attention_mask"].all(), "the batch should be padded"
    for key in ("input_ids", "attention_mask", "pixel_values", image_mask):
        assert ours[key].shape == ref[key].shape, (key, ours[key].shape, ref[key].shape)
        assert torch.equal(ours[key], ref[key].to(ours[key].dtype)), key
