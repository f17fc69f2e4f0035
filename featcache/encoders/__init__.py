"""Registry of frozen image encoders for featcache (contract: docs/architecture.md, guide: docs/encoders.md).

    enc = create_encoder("openai/clip-vit-base-patch32")   # or a local dir, "efficientnet-lite0", "pkg.mod:factory"
    feats = enc.module(torch.stack([enc.preprocess(img) for img in images]))   # (B, enc.dim)
    key, fp = enc.name, fingerprint(enc.metadata)
"""
from featcache.encoders.registry import (
    Encoder,
    EncoderError,
    create_encoder,
    fingerprint,
    list_encoders,
    register_encoder,
)
from featcache.encoders import efficientnet_lite as _efficientnet_lite  # noqa: F401  (registers the name; imports no optional package)

__all__ = ["Encoder", "EncoderError", "create_encoder", "fingerprint", "list_encoders", "register_encoder"]
