"""Image-text matching (ITM) models behind one interface: encode once, fuse pairs, score.

An :class:`ItmScorer` splits a fusion-based matching model (distill.md section 3.2) into its
frozen unimodal part (:meth:`~ItmScorer.encode_image`, :meth:`~ItmScorer.encode_text`), its
cross-modal fusion stack (:meth:`~ItmScorer.fuse`, whose ``layers`` picks which fusion layers
run) and its head (:meth:`~ItmScorer.score`), reproducing the model's own forward exactly.
Kinds live in :data:`ITM_SCORERS`, keyed by ``config.model_type``; plugins register more.
``distill dcd`` trains shallower students through it and ``core/ranking.py`` re-ranks with it.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import nn

from mmkit.errors import ModelError
from mmkit.registry import Registry

#: ``model_type`` -> :class:`ItmScorer` subclass.
ITM_SCORERS: Registry = Registry("ITM model type")

ScoreMode = Literal["logit", "prob"]


@dataclass
class Encoded:
    """Per-item features of one modality: ``feats`` [N, S, d] and their key mask [N, S] (1 = real)."""

    feats: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.feats.shape[0]

    def __getitem__(self, rows: Any) -> "Encoded":
        return Encoded(self.feats[rows], self.mask[rows])

    def to(self, device: Any) -> "Encoded":
        return Encoded(self.feats.to(device), self.mask.to(device))

    @staticmethod
    def cat(parts: Sequence["Encoded"]) -> "Encoded":
        """Concatenate along items, right-padding the sequence axis (padding is masked out)."""
        width = max(p.feats.shape[1] for p in parts)
        feats = [nn.functional.pad(p.feats, (0, 0, 0, width - p.feats.shape[1])) for p in parts]
        masks = [nn.functional.pad(p.mask, (0, width - p.mask.shape[1])) for p in parts]
        return Encoded(torch.cat(feats), torch.cat(masks))


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj: Any, path: str, value: Any) -> None:
    head, _, last = path.rpartition(".")
    setattr(_get(obj, head) if head else obj, last, value)


class ItmScorer(ABC):
    """One ITM model kind. Subclasses name the model's parts and reproduce its forward.

    ``layers_path`` is the fusion ``ModuleList``; ``copied_paths`` are the modules a student
    owns besides its fusion layers (final norms, poolers, head); everything else is the shared
    unimodal part. ``score="prob"`` turns two-way ITM logits into the match probability.
    """

    model_class: str = ""
    layers_path: str = ""
    pooler_paths: tuple[str, ...] = ()
    head_path: str = ""
    has_contrastive: bool = False

    def __init__(self, model: nn.Module, processor: Any = None, score: ScoreMode = "logit") -> None:
        if score not in ("logit", "prob"):
            raise ModelError(f"unknown ITM score {score!r}; expected logit or prob", field="score")
        self.model, self.processor, self.score_mode = model, processor, score

    # ---------------------------------------------------------------- structure

    @property
    def fusion_layers(self) -> nn.ModuleList:
        return _get(self.model, self.layers_path)

    @property
    def num_fusion_layers(self) -> int:
        return len(self.fusion_layers)

    @property
    def copied_paths(self) -> tuple[str, ...]:
        return (*self.pooler_paths, self.head_path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fusion_modules(self) -> list[nn.Module]:
        """The fusion stack, poolers and head: what a student copies and trains."""
        return [self.fusion_layers, *(_get(self.model, p) for p in self.copied_paths)]

    def unimodal_modules(self) -> list[nn.Module]:
        """Every top-level part outside the fusion stack, poolers and head (frozen, shared)."""
        fusion = {id(m) for m in self.fusion_modules()}
        out: list[nn.Module] = []

        def walk(module: nn.Module) -> None:
            for child in module.children():
                if id(child) in fusion:
                    continue
                if any(id(m) in fusion for m in child.modules()):
                    walk(child)
                else:
                    out.append(child)

        walk(self.model)
        return out

    @abstractmethod
    def set_num_layers(self, config: Any, n: int) -> None:
        """Write the fusion depth into a (copied) config."""

    def cut(self, layers: Sequence[int]) -> nn.Module:
        """A model of the same class with the fusion stack cut to ``layers`` (renumbered 0..s-1).

        The unimodal part is *shared* (the same module objects, not copies); the selected fusion
        layers, poolers and head are deep copies with their own memory.
        """
        layers = check_layers(layers, self.num_fusion_layers)
        stack = self.fusion_layers
        memo: dict[int, Any] = {id(m): m for m in self.unimodal_modules()}
        memo[id(stack)] = nn.ModuleList(copy.deepcopy(stack[i]) for i in layers)
        cut = copy.deepcopy(self.model, memo)
        for new_index, layer in enumerate(_get(cut, self.layers_path)):
            self.renumber(layer, new_index)
        self.set_num_layers(cut.config, len(layers))
        return cut

    def renumber(self, layer: nn.Module, index: int) -> None:
        """Give a copied fusion layer its new position (for kinds whose layers store it)."""

    # ---------------------------------------------------------------- compute

    @abstractmethod
    def encode_image(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> Encoded:
        """Frozen image part: ``(B, P, d)`` features and their mask."""

    @abstractmethod
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        """Frozen text part: ``(B, L, d)`` features; the mask is ``attention_mask``."""

    @abstractmethod
    def fuse(self, img: torch.Tensor, txt: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor],
             layers: Sequence[int] | None = None) -> torch.Tensor:
        """Run fusion layers ``layers`` (all when ``None``) on aligned pairs; ``masks`` = (image,
        text). Returns the pooled output the head reads."""

    @abstractmethod
    def score(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head's matching score per pair, ``(B,)``."""

    def _layers(self, layers: Sequence[int] | None) -> list[nn.Module]:
        stack = self.fusion_layers
        return list(stack) if layers is None else [stack[i] for i in layers]

    def fused_scores(self, img: Encoded, txt: Encoded, layers: Sequence[int] | None = None) -> torch.Tensor:
        """``score(fuse(...))`` for aligned pairs of encoded images and texts, ``(B,)``."""
        return self.score(self.fuse(img.feats, txt.feats, (img.mask, txt.mask), layers))

    def pair_scores(self, images: Encoded, texts: Encoded, image_idx: torch.Tensor, text_idx: torch.Tensor,
                    layers: Sequence[int] | None = None, batch_size: int = 256) -> torch.Tensor:
        """Scores of the pairs ``(images[image_idx[j]], texts[text_idx[j]])``, ``(n,)``, fused in
        chunks of ``batch_size`` pairs; each chunk gathers only the rows it needs."""
        out = []
        for start in range(0, len(image_idx), batch_size):
            rows = slice(start, start + batch_size)
            out.append(self.fused_scores(images[image_idx[rows]], texts[text_idx[rows]], layers))
        return torch.cat(out) if out else torch.zeros(0, device=images.feats.device)

    def score_pairs(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """End to end: the model's matching score for aligned (image, text) pairs, ``(B,)``."""
        return self.fused_scores(self.encode_image(pixel_values, pixel_mask),
                                 self.encode_text(input_ids, attention_mask))

    # ---------------------------------------------------------------- preprocessing

    @abstractmethod
    def set_image_size(self, size: int) -> None:
        """Make the processor resize images to ``size`` (the reference's image size)."""

    def preprocess(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """PIL images -> the model's pixel inputs (``pixel_values`` and, for ViLT, ``pixel_mask``)."""
        if self.processor is None:
            raise ModelError("this ITM scorer has no processor", field="model")
        return preprocess_images(self.processor, images)

    @property
    def tokenizer(self) -> Any:
        if self.processor is None:
            raise ModelError("this ITM scorer has no processor", field="model")
        return getattr(self.processor, "tokenizer", self.processor)

    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def encode_image_files(self, images: Sequence[Any], root: Any = None, batch_size: int = 32) -> Encoded:
        """Load (paths under ``root``, PIL images, bytes), preprocess and encode images in input
        order; call under ``torch.inference_mode()`` for evaluation."""
        from mmkit.core.data import input_order_batches, load_image

        parts = []
        for rows in input_order_batches(len(images), batch_size):
            pixels = self.preprocess([load_image(images[i], root) for i in rows])
            parts.append(self.encode_image(**{k: v.to(self.device) for k, v in pixels.items()}))
        return Encoded.cat(parts)

    def encode_captions(self, texts: Sequence[str], max_length: int | None, batch_size: int = 256) -> Encoded:
        """Tokenise (truncating to ``max_length``) and encode captions in input order."""
        from mmkit.core.data import input_order_batches, pad_flat, tokenize_flat

        tokens = tokenize_flat(self.tokenizer, texts, max_length=max_length)
        parts = []
        for rows in input_order_batches(len(tokens), batch_size):
            ids, mask = pad_flat(tokens, rows, self.pad_id())
            parts.append(self.encode_text(ids.to(self.device), mask.to(self.device)))
        return Encoded.cat(parts)

    def score_fn(self, images: Encoded, texts: Encoded, layers: Sequence[int] | None = None,
                 batch_size: int = 256):
        """``fn(image_idx, text_idx) -> scores`` over encoded sets, for ``core.ranking.rerank``."""
        def fn(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
            device = images.feats.device
            return self.pair_scores(images, texts, torch.as_tensor(image_idx, device=device),
                                    torch.as_tensor(text_idx, device=device), layers, batch_size)

        return fn

    # ---------------------------------------------------------------- contrastive head (optional)

    def contrastive_embeddings(self, images: Encoded, texts: Sequence[str], max_length: int | None,
                               batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised ``(image, text)`` embeddings of the model's own dual-encoder head (a
        re-ranking shortlist), from already encoded images; kinds without one raise."""
        raise ModelError(f"{type(self.model).__name__} has no contrastive head; pass a --shortlist model",
                         field="shortlist")


def preprocess_images(processor: Any, images: Sequence[Any]) -> dict[str, torch.Tensor]:
    """PIL images -> pixel inputs with a model's (image) processor; picklable for data workers."""
    proc = getattr(processor, "image_processor", processor)
    out = proc(images=list(images), return_tensors="pt")
    return {k: out[k] for k in ("pixel_values", "pixel_mask") if k in out}


def check_layers(layers: Sequence[int], n: int) -> list[int]:
    """``layers`` as a list, checked: non-empty, strictly increasing, within ``0..n-1``."""
    layers = [int(i) for i in layers]
    if not layers or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0 or layers[-1] >= n:
        raise ModelError(f"expected a strictly increasing list of fusion layers in 0..{n - 1}, got {layers}",
                         field="student_layers")
    return layers


@ITM_SCORERS.register("vilt")
class ViltScorer(ItmScorer):
    """``ViltForImageAndTextRetrieval``: single-stream fusion over [text; image] tokens, pooler
    (dense + tanh) on the first token after the final layernorm, ``rank_output`` logit."""

    model_class = "ViltForImageAndTextRetrieval"
    layers_path = "vilt.encoder.layer"
    pooler_paths = ("vilt.layernorm", "vilt.pooler")
    head_path = "rank_output"

    def set_num_layers(self, config: Any, n: int) -> None:
        config.num_hidden_layers = n

    def encode_image(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> Encoded:
        emb = self.model.vilt.embeddings
        if pixel_mask is None:
            pixel_mask = torch.ones(pixel_values.shape[0], *pixel_values.shape[2:], dtype=torch.long,
                                    device=pixel_values.device)
        x, x_mask, _ = emb.visual_embed(pixel_values, pixel_mask, max_image_length=self.model.config.max_image_length)
        x = x + emb.token_type_embeddings(torch.full_like(x_mask, 1, dtype=torch.long))
        return Encoded(x, x_mask)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        emb = self.model.vilt.embeddings
        x = emb.text_embeddings(input_ids=input_ids)
        x = x + emb.token_type_embeddings(torch.zeros_like(attention_mask, dtype=torch.long))
        return Encoded(x, attention_mask)

    def fuse(self, img: torch.Tensor, txt: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor],
             layers: Sequence[int] | None = None) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        img_mask, txt_mask = masks
        x = torch.cat([txt, img], dim=1)
        mask = create_bidirectional_mask(config=self.model.config, inputs_embeds=x,
                                         attention_mask=torch.cat([txt_mask, img_mask.to(txt_mask.dtype)], dim=1))
        for layer in self._layers(layers):
            x = layer(x, mask)[0]
        return self.model.vilt.pooler(self.model.vilt.layernorm(x))

    def score(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.model.rank_output(pooled).squeeze(-1)

    def set_image_size(self, size: int) -> None:
        proc = getattr(self.processor, "image_processor", self.processor)
        proc.size = {"shortest_edge": int(size)}


@ITM_SCORERS.register("blip")
class BlipScorer(ItmScorer):
    """``BlipForImageTextRetrieval`` with the ITM head: the text encoder's layers (self-attention,
    cross-attention to the image tokens, FFN) fuse; the first text token's final state is pooled
    (no pooler); ``itm_head`` gives two logits, the match logit is index 1."""

    model_class = "BlipForImageTextRetrieval"
    layers_path = "text_encoder.encoder.layer"
    pooler_paths = ()
    head_path = "itm_head"
    has_contrastive = True

    def set_num_layers(self, config: Any, n: int) -> None:
        config.text_config.num_hidden_layers = n

    def renumber(self, layer: nn.Module, index: int) -> None:
        layer.layer_num = index
        for attn in (getattr(layer, "attention", None), getattr(layer, "crossattention", None)):
            if attn is not None:
                attn.self.layer_idx = index

    def encode_image(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> Encoded:
        feats = self.model.vision_model(pixel_values=pixel_values).last_hidden_state
        return Encoded(feats, torch.ones(feats.shape[:-1], dtype=torch.long, device=feats.device))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        return Encoded(self.model.text_encoder.embeddings(input_ids=input_ids), attention_mask)

    def fuse(self, img: torch.Tensor, txt: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor],
             layers: Sequence[int] | None = None) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        img_mask, txt_mask = masks
        config = self.model.text_encoder.config
        self_mask = create_bidirectional_mask(config=config, inputs_embeds=txt, attention_mask=txt_mask)
        cross_mask = create_bidirectional_mask(config=config, inputs_embeds=txt, attention_mask=img_mask,
                                               encoder_hidden_states=img)
        x = txt
        for layer in self._layers(layers):
            x = layer(x, img, attention_mask=self_mask, encoder_attention_mask=cross_mask)
        return x[:, 0, :]

    def score(self, pooled: torch.Tensor) -> torch.Tensor:
        logits = self.model.itm_head(pooled)
        return logits.softmax(dim=-1)[:, 1] if self.score_mode == "prob" else logits[:, 1]

    def set_image_size(self, size: int) -> None:
        proc = getattr(self.processor, "image_processor", self.processor)
        proc.size = {"height": int(size), "width": int(size)}

    def contrastive_embeddings(self, images: Encoded, texts: Sequence[str], max_length: int | None,
                               batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        from mmkit.core.data import input_order_batches, pad_flat, tokenize_flat

        image = nn.functional.normalize(self.model.vision_proj(images.feats[:, 0, :]), dim=-1)
        tokens = tokenize_flat(self.tokenizer, texts, max_length=max_length)
        parts = []
        for rows in input_order_batches(len(tokens), batch_size):
            ids, mask = pad_flat(tokens, rows, self.pad_id())
            out = self.model.text_encoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
            parts.append(self.model.text_proj(out.last_hidden_state[:, 0, :]))
        return image, nn.functional.normalize(torch.cat(parts), dim=-1)


def itm_scorer(model: nn.Module, processor: Any = None, score: ScoreMode = "logit") -> ItmScorer:
    """The :class:`ItmScorer` for ``model`` (looked up by ``config.model_type``); a model of the
    right type but without an ITM head (e.g. a bare ``ViltModel``) is a :class:`ModelError`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = ITM_SCORERS.resolve(str(model_type), field="model")
    import transformers

    expected = getattr(transformers, cls.model_class, None) if cls.model_class else None
    if expected is not None and not isinstance(model, expected):
        raise ModelError(f"expected a {cls.model_class} (an ITM head) for model type {model_type!r}, "
                         f"got {type(model).__name__}", field="model")
    return cls(model, processor, score)
