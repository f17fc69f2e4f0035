"""The methods `maskfer train --method` knows: one declaration each, looked up by name.

A method says what it reads (images, features), which model architecture it builds
(``maskfer.model.create_model`` keys) and how it is fitted: ``"epochs"`` runs the one
training engine (maskfer.engine) with its ``loss``; ``"lbfgs"`` is a convex solve
(maskfer.probe); ``"zero-shot"`` trains nothing (maskfer.zero_shot: CLIP's text tower gives the
classifier). Code asks the method, never compares method names. Stdlib only: the CLI
reads the names at start-up without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    architecture: str          # maskfer.model.create_model key
    needs_images: bool         # the training / evaluation batches carry face images
    needs_features: bool       # ... and cached encoder features
    fit: str = "epochs"        # FITS: "epochs" (maskfer.engine) | "lbfgs" (maskfer.probe) | "zero-shot"
    loss: str = "ce"           # epochs only: "cafe" (CE + separation + diverse) | "ce"

    @property
    def epoch_trained(self) -> bool:
        return self.fit == "epochs"

    def reads_images(self, online_encoder: bool) -> bool:
        """Whether runs of this method load images: for the model, or for --online-encoder to encode."""
        return self.needs_images or online_encoder

    @property
    def online_encoder_ok(self) -> bool:
        """--online-encoder recomputes F every step of an epoch loop, so it needs both."""
        return self.epoch_trained and self.needs_features


_REGISTRY: dict[str, Method] = {}
FITS = ("epochs", "lbfgs", "zero-shot")


def register_method(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    if method.fit not in FITS:
        raise ValueError(f"method {method.name!r}: fit must be one of {', '.join(FITS)}, not {method.fit!r}")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The method called ``name``; KeyError naming the known ones otherwise (TrainConfig.validate turns a
    bad --method into a ConfigError before this is reached)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(_REGISTRY)}") from None


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


register_method(Method("cafe", "CAFE: sigmoid(mask CNN(image)) * F, linear classifier; CE + separation + diverse",
                       architecture="mask", needs_images=True, needs_features=True, loss="cafe"))
register_method(Method("baseline", "end-to-end backbone on the image; no features",
                       architecture="end-to-end", needs_images=True, needs_features=False))
register_method(Method("linear-probe", "converged multinomial logistic regression on F (L-BFGS, L2 chosen on "
                       "validation data)", architecture="linear", needs_images=False, needs_features=True, fit="lbfgs"))
register_method(Method("linear-head", "linear layer on F trained by the epoch loop (Adam, the run's schedule)",
                       architecture="linear", needs_images=False, needs_features=True))
register_method(Method("zero-shot", "CLIP zero-shot: cosine of the L2-normalised F to the text embeddings of the "
                       "class prompts (the store's CLIP text tower); nothing is trained",
                       architecture="zero-shot", needs_images=False, needs_features=True, fit="zero-shot"))
