"""Evaluation metrics: official VQA accuracy (with the OK-VQA stemming as an option), COCO CIDEr, the MME
score and multiple-choice accuracy.

Light on purpose: no torch or transformers here, and pycocoevalcap (Java) and lemminflect are
imported only when CIDEr or OK-VQA stemming is asked for.
"""
from stages.metrics.choice import choice_scores, parse_letter
from stages.metrics.cider import cider
from stages.metrics.mme import mme_scores, parse_yes_no
from stages.metrics.vqa import vqa_accuracy

__all__ = ["choice_scores", "cider", "mme_scores", "parse_letter", "parse_yes_no", "vqa_accuracy"]
