"""Builders for the tiny random-weight test models (design.md section 4, fixture table).

Every builder makes a model from a small config under a fixed ``torch.manual_seed``, saves it
with ``save_pretrained`` (safetensors) next to its tokenizer / processor in ``out`` and returns
``str(out)``, so tests load it back through :func:`mmkit.core.models.load_model` exactly as a
user's checkpoint would be loaded. ``tests/conftest.py`` turns these into session fixtures.

Tokenizers are ``tokenizers`` WordLevel models over :data:`WORDS` (lower-cased, whitespace and
punctuation pre-tokenised) wrapped as ``PreTrainedTokenizerFast``; unknown words map to the
unknown token. Image processors are the ``*Pil`` classes (no torchvision here, design.md
section 5), which also keeps transformers from logging the fallback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

SEED = 0
IMAGE_SIZE = 32
PATCH_SIZE = 8

# COCO object words (the 80 categories, multi-word names split), common English words and
# words from typical instructions, captions and answers. Order is fixed: ids must not move.
_COCO = """
person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop
sign parking meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack
umbrella handbag tie suitcase frisbee skis snowboard sports ball kite baseball bat glove
skateboard surfboard tennis racket bottle wine glass cup fork knife spoon bowl banana apple
sandwich orange broccoli carrot hot pizza donut cake chair couch potted plant bed dining table
toilet tv laptop mouse remote keyboard cell phone microwave oven toaster sink refrigerator book
clock vase scissors teddy hair drier toothbrush
people man woman men women boy girl child children kid kids player dogs cats cars animals
animal tree trees grass road street building buildings sky water field room wall window floor
food plate bike motorbike sofa television computer desk shirt hat grass beach snow
"""
_COMMON = """
the a an and or but not no yes of in on at to from with without for by about as into over
under near next behind front top bottom left right up down out off is are was were be been
being am do does did done have has had having it its this that these those there here what
which who whom whose when where why how all any both each few more most other some such only
own same so than too very can will just should would could may might must shall i you he she
we they me him her us them my your his our their one two three four five six seven eight
nine ten first second last many much little big small large long short tall old new young
good bad great best better high low open closed red blue green yellow white black brown gray
grey pink purple color colors image picture photo scene view sitting standing walking
running riding holding eating playing looking lying flying parked wearing using carrying
sits stands walks rides holds eats plays looks lies flies wears uses carries shows shown
time day night today year years way thing things part place home city house word words
"""
_INSTRUCTIONS = """
describe explain write list give tell answer question questions summarize summary translate
translation classify detail details detailed brief briefly please help make create generate
find identify compare count name list show provide use following text sentence sentences
paragraph story poem code function program python example examples step steps reason reasons
because therefore however also then if else true false correct wrong answer answers option
options choose select number numbers letter user assistant system instruction instructions
response input output task context information about language english chinese french data
model models learn learning train training test result results problem solution idea ideas
list simple short long essay article title topic main key point points important difference
similar different between why how many is there are there does it contain visible
"""
_PUNCT = ". , ? ! : ; ' \" ( ) - / 0 1 2 3 4 5 6 7 8 9"

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def fixture_words() -> list[str]:
    """The fixture vocabulary: unique words in a fixed order (no special tokens)."""
    seen: dict[str, None] = {}
    for chunk in (_COCO, _COMMON, _INSTRUCTIONS, _PUNCT):
        for word in chunk.split():
            seen.setdefault(word.lower(), None)
    return list(seen)


WORDS = fixture_words()


# ----------------------------------------------------------------------------- tokenizers

def _word_level(specials: list[str], unk: str):
    """A lower-casing WordLevel ``tokenizers.Tokenizer``: ``specials`` first (ids 0..), then WORDS."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(),
                                           normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins with spaces, glues punctuation sensibly
    return tok


def bert_tokenizer(model_max_length: int = 512):
    """WordLevel with BERT specials and a ``[CLS] A [SEP] B [SEP]`` template (token_type_ids)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = _word_level(BERT_SPECIALS, "[UNK]")
    ids = {t: tok.token_to_id(t) for t in BERT_SPECIALS}
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


CLIP_SPECIALS = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]


def clip_tokenizer(model_max_length: int = 32):
    """WordLevel with CLIP's BOS/EOS; the EOS id (3) is what ``CLIPTextConfig.eos_token_id`` gets."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = _word_level(CLIP_SPECIALS, "<unk>")
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        pair="<|startoftext|> $A <|endoftext|> $B:1 <|endoftext|>:1",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<pad>", unk_token="<unk>", model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
    )


LM_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
CHAT_ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]

_CHAT_BODY = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ ' <image>' }}"
    "{% elif part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ ' ' + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

#: ``tiny_causal_lm``'s template (Llama-3 style, BOS in the template):
#: ``<s><|user|> text </s><|assistant|> text </s>``. ``tokenizer.apply_chat_template(tokenize=True)``
#: tokenises without special tokens, so the ids start with exactly one BOS.
CHAT_TEMPLATE = "{{ bos_token }}" + _CHAT_BODY

#: ``tiny_llava``'s template (LLaVA-1.5 style, no BOS: the tokenizer adds it), so both
#: ``processor.apply_chat_template(tokenize=True)`` and ``processor(text=rendered, images=...)``
#: give exactly one BOS. Image parts render as `` <image>``, which the processor expands.
LLAVA_CHAT_TEMPLATE = _CHAT_BODY


def lm_tokenizer(image_token: str | None = None, model_max_length: int = 256,
                 chat_template: str = CHAT_TEMPLATE):
    """WordLevel with BOS/EOS/PAD, role tokens, a chat template and optionally ``<image>``.

    BOS is prepended to single sequences (as Llama does); EOS is not appended.
    """
    from tokenizers import AddedToken
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    specials = LM_SPECIALS + CHAT_ROLES + ([image_token] if image_token else [])
    tok = _word_level(specials, "<unk>")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    bos = tok.token_to_id("<s>")
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B:1",
                                            special_tokens=[("<s>", bos)])
    extra: dict[str, Any] = {}
    if image_token:
        extra["extra_special_tokens"] = {"image_token": image_token}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=model_max_length, padding_side="left",
        model_input_names=["input_ids", "attention_mask"], **extra,
    )
    fast.chat_template = chat_template
    return fast


# ----------------------------------------------------------------------------- image processors

def _pil_image_processor(name: str, **kwargs):
    """``transformers.<name>Pil`` (no torchvision needed, no fallback log), else ``<name>``."""
    import transformers

    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name)
    return cls(**kwargs)


def clip_image_processor(size: int = IMAGE_SIZE):
    return _pil_image_processor("CLIPImageProcessor", size={"shortest_edge": size},
                                crop_size={"height": size, "width": size})


# ----------------------------------------------------------------------------- models

def _save(model, preprocessor, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if preprocessor is not None:
        preprocessor.save_pretrained(out)
    return str(out)


def build_bert(out: Path, num_layers: int = 2, hidden: int = 32, classifier: bool = False,
               **overrides: Any) -> str:
    """``BertModel`` (or ``BertForSequenceClassification``, 2 labels) + the BERT WordLevel tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    tok = bert_tokenizer()
    params: dict[str, Any] = dict(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=num_layers,
        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128,
        type_vocab_size=2, pad_token_id=tok.pad_token_id,
    )
    if classifier:
        params["num_labels"] = 2
    params.update(overrides)
    config = BertConfig(**params)
    torch.manual_seed(SEED)
    model = (BertForSequenceClassification if classifier else BertModel)(config).eval()
    return _save(model, tok, out)


def clip_configs(vocab_size: int, eos: int, bos: int, pad: int):
    from transformers import CLIPConfig, CLIPTextConfig

    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                          projection_dim=16, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    vision = clip_vision_config()
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)


def clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                            projection_dim=16)


def build_clip(out: Path) -> str:
    """``CLIPModel`` + ``CLIPProcessor`` (WordLevel tokenizer, Pil image processor of size 32)."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    tok = clip_tokenizer()
    config = clip_configs(len(tok), tok.eos_token_id, tok.bos_token_id, tok.pad_token_id)
    torch.manual_seed(SEED)
    model = CLIPModel(config).eval()
    proc = CLIPProcessor(image_processor=clip_image_processor(), tokenizer=tok)
    return _save(model, proc, out)


def build_llava(out: Path) -> str:
    """``LlavaForConditionalGeneration``: tiny CLIP vision tower + Llama 32 x 2, ``LlavaProcessor``."""
    import torch
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = lm_tokenizer(image_token="<image>", chat_template=LLAVA_CHAT_TEMPLATE)
    image_id = tok.convert_tokens_to_ids("<image>")
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=clip_vision_config().to_dict(), text_config=text.to_dict(),
                         image_token_id=image_id, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).eval()
    proc = LlavaProcessor(image_processor=clip_image_processor(), tokenizer=tok,
                          patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
                          image_token="<image>")
    return _save(model, proc, out)


def build_vilt(out: Path) -> str:
    """``ViltForImageAndTextRetrieval`` (hidden 32 x 6 layers) + ``ViltProcessor`` (size 32)."""
    import torch
    from transformers import ViltConfig, ViltForImageAndTextRetrieval, ViltProcessor

    tok = bert_tokenizer(model_max_length=40)
    config = ViltConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=6,
                        num_attention_heads=2, intermediate_size=64, image_size=IMAGE_SIZE,
                        patch_size=PATCH_SIZE, max_position_embeddings=40,
                        max_image_length=-1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(SEED)
    model = ViltForImageAndTextRetrieval(config).eval()
    image_proc = _pil_image_processor("ViltImageProcessor", size={"shortest_edge": IMAGE_SIZE},
                                      size_divisor=PATCH_SIZE)
    return _save(model, ViltProcessor(image_processor=image_proc, tokenizer=tok), out)


def build_blip_itm(out: Path) -> str:
    """``BlipForImageTextRetrieval`` (vision 32 x 2, text 32 x 4 with cross-attention) + processor."""
    import torch
    from transformers import (BlipConfig, BlipForImageTextRetrieval, BlipProcessor,
                              BlipTextConfig, BlipVisionConfig)

    tok = bert_tokenizer(model_max_length=64)
    text = BlipTextConfig(vocab_size=len(tok), hidden_size=32, encoder_hidden_size=32,
                          intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                          max_position_embeddings=64, projection_dim=16,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                          eos_token_id=tok.sep_token_id, sep_token_id=tok.sep_token_id)
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                              projection_dim=16)
    config = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=16, image_text_hidden_size=16)
    torch.manual_seed(SEED)
    model = BlipForImageTextRetrieval(config).eval()
    image_proc = _pil_image_processor("BlipImageProcessor",
                                      size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return _save(model, BlipProcessor(image_processor=image_proc, tokenizer=tok), out)


def build_causal_lm(out: Path) -> str:
    """``LlamaForCausalLM`` hidden 32 x 2 layers, 4 heads + WordLevel (BOS/EOS/PAD, chat template)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = lm_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return _save(model, tok, out)


def build_image_classifier(out: Path, num_labels: int = 10) -> str:
    """``ResNetForImageClassification`` (widths 8-16) for 32 px images + an image processor of size 32."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic", num_labels=num_labels,
                          id2label={i: f"class_{i}" for i in range(num_labels)},
                          label2id={f"class_{i}": i for i in range(num_labels)})
    torch.manual_seed(SEED)
    model = ResNetForImageClassification(config).eval()
    # ResNet checkpoints ship a ConvNext image processor (AutoImageProcessor maps resnet to it);
    # crop_pct=1 so a 32 px image is resized to 32 and not centre-cropped.
    image_proc = _pil_image_processor("ConvNextImageProcessor", size={"shortest_edge": IMAGE_SIZE},
                                      crop_pct=1.0)
    return _save(model, image_proc, out)


class _DropPilFallback(logging.Filter):
    """Drops transformers' "no torchvision, falling back to the Pil image processor" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("requires torchvision (not installed); falling back to" in msg
                    or ("backend is not available. Falling back to" in msg and "pil" in msg))


def quiet_transformers() -> None:
    """Silence the expected Pil-fallback warnings (design.md section 6), nothing else."""
    for name in ("transformers.utils.import_utils",
                 "transformers.models.auto.image_processing_auto"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPilFallback) for f in logger.filters):
            logger.addFilter(_DropPilFallback())
