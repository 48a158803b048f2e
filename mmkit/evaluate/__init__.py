"""``mmkit evaluate`` benchmarks: a registry of name -> benchmark object (lazy ``"module:attr"``).

A benchmark implements the hooks ``load``, ``prompt``, ``parse`` and ``score``; embedding-based
ones (retrieval, representation) implement only ``load`` and ``score`` (design.md §1,
evaluate.md §1). It declares the capability it ``needs`` from a model (``generate``, ``itm`` or
``embed``); a model that does not offer it is a one-line error naming both. Plugins register
their own benchmarks with ``BENCHMARKS.register("name", obj_or_"module:attr")`` (``--plugin``).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

from mmkit.errors import MmkitError
from mmkit.registry import Registry

#: Capabilities a benchmark may need and a model may offer.
CAPABILITIES = ("generate", "itm", "embed")
#: The hooks a benchmark may implement, in the order a run calls them.
HOOKS = ("load", "prompt", "parse", "score")


@runtime_checkable
class Benchmark(Protocol):
    """What every benchmark offers; ``prompt`` and ``parse`` are optional (generation benchmarks)."""

    name: str
    version: str
    needs: str

    def load(self, cfg: Any) -> Any:
        """Read and check the benchmark's data."""

    def score(self, data: Any, cfg: Any) -> dict[str, Any]:
        """Turn answers (or embeddings) into metrics."""


BENCHMARKS: Registry = Registry("benchmark")
BENCHMARKS.register("retrieval", "mmkit.evaluate.retrieval:BENCHMARK")
BENCHMARKS.register("representation", "mmkit.evaluate.representation:BENCHMARK")
BENCHMARKS.register("mmr", "mmkit.evaluate.mmr:BENCHMARK")
BENCHMARKS.register("realbench", "mmkit.evaluate.realbench:BENCHMARK")
BENCHMARKS.register("snare", "mmkit.evaluate.snare:BENCHMARK")
BENCHMARKS.register("mmt", "mmkit.evaluate.mmt:BENCHMARK")
BENCHMARKS.register("chair", "mmkit.evaluate.hallucination:CHAIR")
BENCHMARKS.register("pope", "mmkit.evaluate.hallucination:POPE")


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark ``name`` (an unknown name suggests the closest)."""
    return BENCHMARKS.resolve(name, field="benchmark")


def hooks(benchmark: Benchmark) -> list[str]:
    """The hooks ``benchmark`` implements."""
    return [h for h in HOOKS if callable(getattr(benchmark, h, None))]


def model_offers(config: Any) -> list[str]:
    """The capabilities of a model, from its config: a dual encoder offers ``embed`` and ``itm``
    (cosine), an ITM head or cross-encoder ``itm``, an image-text-to-text model ``generate``."""
    from mmkit.core.embed import is_dual_encoder
    from mmkit.core.itm import ITM_SCORERS

    offers = []
    if is_dual_encoder(config):
        offers += ["embed", "itm"]
    elif getattr(config, "model_type", None) in ITM_SCORERS:
        offers.append("itm")
    if any("ConditionalGeneration" in a or "ImageTextToText" in a for a in getattr(config, "architectures", None) or ()):
        offers.append("generate")
    return offers


def check_capability(benchmark: Benchmark, model_id: str, config: Any, needs: str | None = None) -> None:
    """Raise a one-line error when the model does not offer what the benchmark needs, e.g.
    ``retrieval needs an embed model; llava (LlavaForConditionalGeneration) offers: generate``."""
    needs = needs or benchmark.needs
    offers: Sequence[str] = model_offers(config)
    if needs not in offers:
        cls = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        raise MmkitError(f"{benchmark.name} needs an {needs} model; {model_id} ({cls}) offers: "
                         f"{', '.join(offers) or 'nothing mmkit can use'}", field="--model")
