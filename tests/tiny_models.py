"""Tiny random transformers models built from configs and saved with save_pretrained, so tests load them
through the same from_pretrained code path as a downloaded model. No file comes from a hub: the
tokenizers are built here from a word list. Each builder takes well under a second."""

from __future__ import annotations

from pathlib import Path

import torch

# Enough words that a random decoder's output reads as words; "yes"/"no" first so VQA answers can hit them.
WORDS = ["yes", "no", "a", "photo", "of", "woman", "man", "dog", "cat", "red", "blue", "green", "the", "is", "there",
         "watermark", "logo", "text", "grid", "collage", "this", "or", "an", "image", "with", "?", ",", "."]
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
IMAGE_PX = 32  # what the tiny image processors resize to


def _bert_tokenizer():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's decoder starts from [DEC]
    return tokenizer, len(vocab)


def tiny_blip(dest: Path, task: str = "vqa", seed: int = 0, init_std: float = 0.5) -> Path:
    """A BLIP model (``task`` vqa: BlipForQuestionAnswering, caption: BlipForConditionalGeneration) with
    its BlipProcessor. ``init_std`` above the default 0.02 lets different images give different text."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    tokenizer, vocab_size = _bert_tokenizer()
    config = BlipConfig(
        text_config=dict(vocab_size=vocab_size, bos_token_id=5, sep_token_id=3, pad_token_id=0, max_position_embeddings=64, **TINY),
        vision_config=dict(image_size=IMAGE_PX, patch_size=8, **TINY),
        projection_dim=32, initializer_range=init_std,
    )
    config.text_config.initializer_range = config.vision_config.initializer_range = init_std
    torch.manual_seed(seed)
    model = (BlipForQuestionAnswering if task == "vqa" else BlipForConditionalGeneration)(config).eval()
    model.save_pretrained(dest)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": IMAGE_PX, "width": IMAGE_PX}), tokenizer=tokenizer).save_pretrained(dest)
    return dest


def tiny_vit_gpt2(dest: Path, seed: int = 0, init_std: float = 0.5) -> Path:
    """A VisionEncoderDecoderModel (ViT encoder + GPT-2 decoder) with ViTImageProcessor and a GPT-2 tokenizer."""
    from transformers import GPT2Config, GPT2Tokenizer, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig, ViTImageProcessor

    # Byte-level BPE with no merges: every word is a single token (its "Ġword" form after a space).
    vocab: dict[str, int] = {}
    for token in ["<|endoftext|>", "<|startoftext|>", *WORDS, *("\u0120" + w for w in WORDS), *"abcdefghijklmnopqrstuvwxyz"]:
        vocab.setdefault(token, len(vocab))
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=[], bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    encoder = ViTConfig(image_size=IMAGE_PX, patch_size=8, initializer_range=init_std, **TINY)
    decoder = GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=0, initializer_range=init_std)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 0
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config=config).eval()
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    ViTImageProcessor(size={"height": IMAGE_PX, "width": IMAGE_PX}).save_pretrained(dest)
    return dest


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def tiny_llava(dest: Path, seed: int = 0) -> Path:
    """A LLaVA model (CLIP vision tower + Llama decoder) with a LlavaProcessor and a chat template: the
    generic AutoModelForImageTextToText path that SmolVLM-class models take."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

    vocab = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "user", "assistant", ":", *WORDS]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()  # joins tokens with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE_PX}, crop_size={"height": IMAGE_PX, "width": IMAGE_PX}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=IMAGE_PX, patch_size=8, projection_dim=32, **TINY),
        text_config=LlamaConfig(vocab_size=len(vocab), num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, **TINY),
        image_token_index=4, vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).eval().save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest
