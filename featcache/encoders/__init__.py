"""Registry of frozen image encoders for featcache (contract: docs/architecture.md, guide: docs/encoders.md).

    enc = create_encoder("openai/clip-vit-base-patch32")   # or a local dir, "efficientnet-lite0", "pkg.mod:factory"
    feats = enc.module(torch.stack([enc.preprocess(img) for img in images]))   # (B, enc.dim)
    key, fp = enc.name, fingerprint(enc.metadata)
    enc = create_encoder(spec, preprocess="official")        # the official CAFE input (featcache/encoders/modes.py)
"""
from featcache.encoders.registry import (
    Encoder,
    EncoderError,
    FingerprintMismatch,
    UntrustedSpecError,
    create_encoder,
    create_recorded_encoder,
    fingerprint,
    list_encoders,
    register_encoder,
)
from featcache.encoders.modes import PREPROCESS_MODES, preprocess_mode
from featcache.encoders import efficientnet_lite as _efficientnet_lite  # noqa: F401  (registers the name; imports no optional package)
from featcache.encoders import expression as _expression  # noqa: F401  (pyemotion-fer2013, fer-minixception)

__all__ = ["Encoder", "EncoderError", "FingerprintMismatch", "UntrustedSpecError", "create_encoder",
           "create_recorded_encoder", "fingerprint", "list_encoders", "register_encoder",
           "PREPROCESS_MODES", "preprocess_mode"]
