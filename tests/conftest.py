"""Shared fixtures. Offline on purpose: every test must pass with no network and no downloaded weights."""
import os

# Set before transformers / huggingface_hub are imported anywhere: they read these once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8, projection_dim=16)


def _save_processor(path: Path) -> None:
    # Same preprocessor_config.json a real CLIP repo has, so AutoImageProcessor(backend="pil") loads it
    # exactly as it loads "openai/clip-vit-base-patch32".
    from featcache.encoders.random_clip import save_clip_processor

    save_clip_processor(path, 32)


def _make_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A random tiny CLIPVisionModelWithProjection + processor saved with save_pretrained."""
    from featcache.encoders.random_clip import save_random_clip

    return save_random_clip(path, seed=seed, **_TINY_VISION)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """Directory of a tiny random CLIP vision model (16-d image_embeds, 32x32 input), transformers format."""
    return _make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="session")
def tiny_full_clip_dir(tmp_path_factory) -> Path:
    """Directory of a tiny random full CLIPModel (text + vision towers), as most hub CLIP repos are."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    path = tmp_path_factory.mktemp("clip") / "tiny-full-clip"
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=99, max_position_embeddings=16,
                pad_token_id=1, bos_token_id=0, eos_token_id=2)  # ids inside the tiny vocab: no config warning
    # vision_config keeps the default projection_dim (512) while the real one is top-level (16), as in
    # some converted hub repos: the loader must size the projection from the top-level value.
    vision = {k: v for k, v in _TINY_VISION.items() if k != "projection_dim"}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    _save_processor(path)
    return path


@pytest.fixture
def fer_data_dir() -> Path:
    """Root of the real FER data (env FER_DATA_DIR, else ../shared/data/fer); skips the test when absent."""
    root = Path(os.environ.get("FER_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared/data/fer")
    if not root.is_dir():
        pytest.skip(f"real FER data not found at {root}")
    return root


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread for the whole suite: on a small shared machine two threads oversubscribe
    the cores and run several times slower, and a fixed count keeps CPU results bit-identical between
    runs (the resume tests compare them)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
