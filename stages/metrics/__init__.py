"""Evaluation metrics: official VQA accuracy (with the OK-VQA stemming as an option) and COCO CIDEr.

Light on purpose: no torch or transformers here, and pycocoevalcap (Java) and lemminflect are
imported only when CIDEr or OK-VQA stemming is asked for.
"""
from stages.metrics.cider import cider
from stages.metrics.vqa import vqa_accuracy

__all__ = ["cider", "vqa_accuracy"]
