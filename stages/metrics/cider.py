"""CIDEr for captioning, exactly as the COCO caption evaluation computes it (pycocoevalcap), ×100."""
from __future__ import annotations

from collections.abc import Hashable

from stages.errors import UserError


def cider(predictions: dict[Hashable, str], references: dict[Hashable, list[str]]) -> float:
    """Corpus CIDEr-D of one caption per id against that id's reference captions, ×100 (papers report ×100).

    Both sides go through pycocoevalcap's PTBTokenizer first, as COCOEvalCap does: it lowercases,
    splits PTB-style and drops punctuation tokens, and untokenised text scores differently. The
    tokenizer runs Java (Stanford CoreNLP, shipped in the pycocoevalcap wheel) and writes a temporary
    file next to its jar, so pycocoevalcap's install folder must be writable. Its document
    frequencies come from the references given here, so the score depends on the whole set.
    """
    missing = predictions.keys() - references.keys()
    extra = references.keys() - predictions.keys()
    if missing or extra:
        raise UserError(
            f"CIDEr needs the same ids on both sides: {len(missing)} predictions have no references "
            f"(e.g. {sorted(map(str, missing))[:3]}), {len(extra)} references have no prediction "
            f"(e.g. {sorted(map(str, extra))[:3]}); score predictions for exactly the evaluated ids"
        )
    if not predictions:
        raise UserError("CIDEr of an empty set of predictions is undefined; evaluate at least one caption")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise UserError(
            f"{len(empty)} ids have no reference captions (e.g. {sorted(map(str, empty))[:3]}); "
            "each image needs at least one"
        )

    # Imported here: the stages also run on machines without pycocoevalcap (and without Java).
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    # COCOEvalCap tokenizes references and predictions in two separate calls; we do the same.
    refs_tok = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    preds_tok = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    score, _per_image = Cider().compute_score(refs_tok, preds_tok)
    return 100.0 * float(score)
