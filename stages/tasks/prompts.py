"""The prompts of seed Tab. 6, as interleaved pieces (text and images) that any family can encode.

Tab. 6 covers VQA and captions. MME (yes/no) and multiple choice (SEED-Bench, MMMU-Pro) follow its form:
an instruction, then "Image:{image} Question: {q} Answer: {a}\n" per item; multiple-choice items list the
lettered options after the question ("... Options: A. {a} B. {b} Answer: B"), and the answer shown is the letter.

A prompt is a context (instruction + in-context demonstrations) and a query; the teacher appends
the answer and EOS to the query, and that query + answer + EOS is the span the store keeps.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from PIL import Image

from stages.tasks.sample import Sample

VQA_INSTRUCTION = "Instruction: provide an answer to the question. Use the image to answer.\n"
CAPTION_ICL_INSTRUCTION = "Instruction: provide a short caption of the input image.\n"
YESNO_INSTRUCTION = "Instruction: answer the question with yes or no. Use the image to answer.\n"
CHOICE_INSTRUCTION = "Instruction: choose the correct option and answer with its letter. Use the image to answer.\n"
LETTERS = "ABCDEFGHIJ"  # option letters, up to MMMU-Pro's ten options

Piece = str | Image.Image


@dataclass(frozen=True)
class Prompt:
    """context: instruction + ICDs; query: the query item, ending in "Answer:"/"Caption:" or with the answer appended.

    with_eos: an EOS token follows the query (teacher and student sequences).
    drop_context: the context is only there so the query tokenizes exactly as it does after it;
    the model sees [BOS] + query (MimIC evaluation, METHOD.md §6).
    """

    context: tuple[Piece, ...]
    query: tuple[Piece, ...]
    with_eos: bool = False
    drop_context: bool = False


def reference_answer(sample: Sample, policy: str = "most_common") -> str:
    """The answer a demonstration or a target shows: the annotators' most common answer (ties: first in file order), or the first."""
    if policy == "first":
        return sample.answers[0]
    counts = Counter(sample.answers)
    return max(sample.answers, key=lambda a: counts[a])  # max keeps the first of equal counts


def _item(kind: str, sample: Sample, image: Image.Image, answer: str | None) -> list[Piece]:
    """One demonstration or query: "Image:{image} Question: {q} Answer: {a}\n" (VQA, yes/no), the same with
    " Options: A. {o1} B. {o2} ..." after the question (multiple choice), or "Image:{image} Caption: {c}\n"."""
    if kind == "caption":
        text = " Caption:"
    else:
        options = "".join(f" {letter}. {option}" for letter, option in zip(LETTERS, sample.options))
        options = " Options:" + options if kind == "choice" else ""
        text = f" Question: {sample.question}{options} Answer:"
    if answer is not None:
        text += f" {answer}"
    return ["Image:", image, text]


def instruction(kind: str, mode: str) -> str:
    """Tab. 6 prefix: the VQA (yes/no, choice) instruction in every mode; captions have one only with ICL
    ("X" for zero-shot)."""
    if kind == "caption":
        return CAPTION_ICL_INSTRUCTION if mode == "icl" else ""
    return {"vqa": VQA_INSTRUCTION, "yesno": YESNO_INSTRUCTION, "choice": CHOICE_INSTRUCTION}[kind]


def build_prompt(kind: str, mode: str, query: Sample, icds: list[tuple[Sample, str]], answer: str | None = None,
                 load=lambda s: s.load_image()) -> Prompt:
    """mode: "zero-shot" | "icl" | "mimic". icds: (sample, its answer) pairs, used in "icl" only.

    answer given: the teacher/student sequence (answer + EOS appended).
    """
    # MimIC drops the context, but tokenizes the query after the ICL instruction as the teacher's span
    # was, so that the ids equal the student's (SentencePiece marks a word at the start of a text).
    prefix = instruction(kind, "icl" if mode == "mimic" else mode)
    context: list[Piece] = [prefix] if prefix else []
    for sample, icd_answer in icds if mode == "icl" else []:
        *pieces, last = _item(kind, sample, load(sample), icd_answer)
        context += [*pieces, last + "\n"]
    return Prompt(tuple(context), tuple(_item(kind, query, load(query), answer)),
                  with_eos=answer is not None, drop_context=mode == "mimic")
