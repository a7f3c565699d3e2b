"""Small, randomly initialised transformers for the transformer and save/load tests.

Real ``transformers`` and ``timm`` classes with tiny configs (no hub access): two layers,
hidden size 64, four heads of 16, FFN 128 for the text models; timm ViT/DeiT tiny at 32x32
pixels with two blocks (three heads of 64, MLP 768). Each builder seeds torch, so two calls
give the same weights.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             vocab_size=200, max_position_embeddings=64)
VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              image_size=32, patch_size=8, num_labels=5)


def _hf(model_cls: str, config_cls: str, **config: Any) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        import transformers

        cfg = getattr(transformers, config_cls)(**config)
        return getattr(transformers, model_cls)(cfg)

    return make


def _timm(name: str, **kwargs: Any) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return make


TIMM_KWARGS = dict(img_size=32, depth=2, num_classes=5)

BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "bert": _hf("BertForSequenceClassification", "BertConfig", **SMALL),
    "roberta": _hf("RobertaForSequenceClassification", "RobertaConfig", **SMALL),
    "xlm_roberta": _hf("XLMRobertaForSequenceClassification", "XLMRobertaConfig", **SMALL),
    "distilbert": _hf("DistilBertForSequenceClassification", "DistilBertConfig", dim=64,
                      n_layers=2, n_heads=4, hidden_dim=128, vocab_size=200,
                      max_position_embeddings=64),
    "electra": _hf("ElectraForSequenceClassification", "ElectraConfig", embedding_size=32,
                   **SMALL),
    "mpnet": _hf("MPNetForSequenceClassification", "MPNetConfig", **SMALL),
    "timm_vit": _timm("vit_tiny_patch16_224", **TIMM_KWARGS),
    "timm_deit": _timm("deit_tiny_patch16_224", **TIMM_KWARGS),
    "hf_vit": _hf("ViTForImageClassification", "ViTConfig", **VISION),
    "hf_deit": _hf("DeiTForImageClassification", "DeiTConfig", **VISION),
}
TEXT = ["bert", "roberta", "xlm_roberta", "distilbert", "electra", "mpnet"]
IMAGE = ["timm_vit", "timm_deit", "hf_vit", "hf_deit"]
LENGTHS = (10, 6, 3)  # one full row and two padded rows


def make(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[name]().eval()


def inputs(name: str, model: torch.nn.Module, seed: int = 1) -> Any:
    """Example inputs: token ids with an attention mask and real padding (pad tokens after
    each row's length), or a batch of images (a tensor for timm, ``pixel_values`` for HF)."""
    g = torch.Generator().manual_seed(seed)
    if name in TEXT:
        pad = model.config.pad_token_id or 0
        n = max(LENGTHS)
        ids = torch.randint(3, model.config.vocab_size, (len(LENGTHS), n), generator=g)
        mask = torch.zeros(len(LENGTHS), n, dtype=torch.long)
        for row, length in enumerate(LENGTHS):
            mask[row, :length] = 1
            ids[row, length:] = pad
        return {"input_ids": ids, "attention_mask": mask}
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    return pixels if name.startswith("timm") else {"pixel_values": pixels}


def logits(model: torch.nn.Module, x: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def encoder_params(model: torch.nn.Module) -> int:
    """Parameters of the transformer body (everything but the classifier)."""
    skip = ("classifier", "head.", "pre_classifier")
    return sum(p.numel() for n, p in model.named_parameters()
               if not any(n.startswith(s) or f".{s}" in n for s in skip))
