"""What every task loader returns: one question (or one image to caption) with its references."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from stages.errors import UserError


@dataclass(frozen=True)
class Sample:
    """One query of a task.

    id: the data set's own id as a string (VQA question_id, COCO image id for captions).
    image: a file path (str) or encoded image bytes (HF datasets keep PNG/JPEG bytes).
    question: the question text; None for captioning.
    answers: VQA: the 10 annotator answers, in file order; captions: the reference captions;
        MME: "Yes" or "No"; multiple choice: the right option's letter.
    options: multiple choice only: the option texts, lettered A, B, ... in this order.
    category: the sub-task the metric reports apart (MME subtask, SEED-Bench dimension, MMMU-Pro subject).
    """

    id: str
    image: str | bytes
    question: str | None
    answers: tuple[str, ...]
    options: tuple[str, ...] = ()
    category: str = ""

    def load_image(self) -> Image.Image:
        """Decode the image as RGB; a missing, empty, corrupt or huge file is a UserError naming it."""
        where = self.image if isinstance(self.image, str) else f"<bytes of sample {self.id}>"
        if isinstance(self.image, str) and os.path.isfile(self.image) and os.path.getsize(self.image) == 0:
            raise UserError(f"image file is empty (0 bytes): {where} (sample {self.id})")
        try:
            src = io.BytesIO(self.image) if isinstance(self.image, bytes) else self.image
            with Image.open(src) as im:
                im.load()
                return im.convert("RGB")
        except Image.DecompressionBombError as e:  # PIL's guard against a small file that decodes to gigabytes
            raise UserError(f"image is too large to decode: {where} (sample {self.id}): {e}") from None
        except FileNotFoundError:
            raise UserError(f"image file not found: {where} (sample {self.id})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise UserError(f"image is truncated or corrupt: {where} (sample {self.id}): {e}") from None
