"""`featcache info` and `featcache verify`: summarise and check a store."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from featcache.build import encode_views
from featcache.encoders import UntrustedSpecError, create_encoder, fingerprint, preprocess_mode
from featcache.images import ImageError, load_image
from featcache.manifests import list_items, manifest_from_record
from featcache.store import AUG_FEATURES, AUG_PARAMS, Store, bad_rows, checksums_of
from featcache.taxonomy import CLASSES
from featcache.views import PARAMS, Recipe, image_keys, view_params


def summarize(store: Store) -> dict:
    """A JSON-able summary: datasets, rows per split and class, encoders, image sizes."""
    out = {"path": str(store.path), "schema_version": int(store.attrs["schema_version"]),
           "tool_version": str(store.attrs.get("tool_version", "")), "datasets": {}}
    for name in store.datasets():
        ds = store.dataset(name)
        labels, splits = ds.labels, ds.splits
        per_split = {}
        for s in ds.split_names():
            counts = np.bincount(labels[splits == s], minlength=len(CLASSES))
            per_split[s] = {"total": int(counts.sum()), **{c: int(k) for c, k in zip(CLASSES, counts)}}
        encs = {}
        for key in ds.encoders():
            info = ds.encoder_info(key)
            aug = ds.aug_recipe(key)
            encs[key] = {"model": info.get("spec", ""), "dim": int(info["dim"]), "dtype": info["dtype"],
                         "views": info["views"], "fingerprint": info["fingerprint"],
                         "precision": info.get("compute_precision", ""),
                         "preprocess": preprocess_mode(info.get("metadata") or {}),
                         "aug_views": aug}  # None, or K, seed, source/input size and recipe
        a = ds.attrs
        out["datasets"][name] = {
            "rows": len(ds), "manifest": a.get("manifest_name"), "manifest_sha256": a.get("manifest_sha256"),
            "root": a.get("root"), "splits": per_split, "dropped": a.get("dropped", {}),
            "skipped": len(ds.skipped), "encoders": encs, "image_sizes": ds.image_sizes(),
        }
    return out


def verify(store: Store, sample: int = 8, root: str | None = None, device: str = "cpu", seed: int = 0,
           reencode: bool = True, atol: float = 1e-3, trust_plugins: bool = False) -> list[tuple[str, bool, str]]:
    """Integrity checks; returns (check, passed, detail) rows. Re-encoding a sample needs the
    dataset root and the encoder; when either is missing that check says so and is not counted as passed.
    A plug-in encoder spec stored in the file is not imported unless ``trust_plugins`` (--trust-plugins)."""
    results: list[tuple[str, bool | None, str]] = []
    for name in store.datasets():
        ds = store.dataset(name)
        ids = ds.ids
        dup = [k for k, v in Counter(ids.tolist()).items() if v > 1]
        results.append((f"{name}: ids unique", not dup, f"{len(ids)} ids" + (f", duplicates e.g. {dup[:3]}" if dup else "")))
        lab = ds.labels
        bad = np.flatnonzero((lab < 0) | (lab >= len(CLASSES)))
        results.append((f"{name}: labels in 0..{len(CLASSES) - 1}", bad.size == 0,
                        "ok" if bad.size == 0 else f"{bad.size} bad, first row {bad[0]} ({ids[bad[0]]})"))
        empty = np.flatnonzero(ds.splits == "")
        results.append((f"{name}: splits set", empty.size == 0, f"{ds.split_names()}"))
        for key in ds.encoders():
            info = ds.encoder_info(key)
            d = ds.group["encoders"][key]["features"]
            nonfinite, first = 0, None
            for start in range(0, d.shape[0], 8192):  # chunked: memory flat for any store size
                blk = d[start:start + 8192]
                rows = np.flatnonzero(~np.isfinite(blk).all(axis=(1, 2)))
                if rows.size and first is None:
                    first = start + int(rows[0])
                nonfinite += rows.size
            results.append((f"{name}/{key}: features finite", nonfinite == 0,
                            "ok" if not nonfinite else f"{nonfinite} rows with NaN/inf, first {ids[first]}"))
            results.append((f"{name}/{key}: shape", d.shape == (len(ds), 2, int(info["dim"])), str(d.shape)))
            results.append(_checksums(f"{name}/{key}: features checksums", d, ids))
            if ds.aug_views(key):
                results.extend(_aug_checks(ds, key, int(info["dim"]), ids))
            if reencode and sample:
                results.append(_reencode(ds, key, info, sample, root, device, seed, atol, trust_plugins))
        for size in ds.image_sizes():
            results.append(_checksums(f"{name}/images/{size}: checksums", ds.group["images"][str(size)], ids))
    return results


def _aug_checks(ds, key: str, dim: int, ids, block: int = 4096) -> list[tuple[str, bool | None, str]]:
    """The augmented views of one encoder: shapes, finite, every (row, view) against its CRC-32, and the
    parameter rows against ``view_params`` of the ids (they are a pure function of seed, id and view)."""
    eg = ds.group["encoders"][key]
    f, p = eg[AUG_FEATURES], eg[AUG_PARAMS]
    a = ds.aug_recipe(key)
    k, n = f.shape[1], len(ds)
    tag = f"{ds.name}/{key}: augmented views"
    rows = [(f"{tag} shape", f.shape == (n, k, dim) and p.shape == (n, k, len(PARAMS)),
             f"features {f.shape}, params {p.shape}")]
    nonfinite = first = 0
    mismatch, first_bad = 0, None
    try:
        recipe = Recipe.from_dict({kk: a[kk] for kk in Recipe().to_dict()})
    except (KeyError, TypeError) as e:
        recipe = None
        rows.append((f"{tag} recipe", False, f"the stored recipe cannot be read ({e}): {a}"))
    for start in range(0, n, block):
        blk = f[start:start + block]
        bad = np.flatnonzero(~np.isfinite(blk).all(axis=(1, 2)))
        if bad.size and not nonfinite:
            first = start + int(bad[0])
        nonfinite += bad.size
        if recipe is not None:
            want = view_params(image_keys(ids[start:start + block]), range(k), recipe, a["seed"]).numpy()
            diff = np.flatnonzero((p[start:start + block] != want).any(axis=(1, 2)))
            if diff.size and first_bad is None:
                first_bad = start + int(diff[0])
            mismatch += diff.size
    rows.append((f"{tag} finite", nonfinite == 0,
                 "ok" if not nonfinite else f"{nonfinite} rows with NaN/inf, first {ids[first]}"))
    if recipe is not None:
        rows.append((f"{tag} params", mismatch == 0,
                     f"{n} x {k} rows equal view_params of their ids (seed {a['seed']})"
                     if not mismatch else f"{mismatch} rows differ from view_params of their ids (seed {a['seed']}), "
                     f"first row {first_bad} ({ids[first_bad]}): the parameters do not match their seed"))
    rows.append(_checksums(f"{tag} features checksums", f, ids))
    rows.append(_checksums(f"{tag} params checksums", p, ids))
    return rows


def _checksums(check: str, d, ids) -> tuple[str, bool | None, str]:
    """Every row of a features or images array against its stored CRC-32 (all rows, not a sample)."""
    crc = checksums_of(d)
    if crc is None:
        return (check, None, f"not checked: {d.name} has no checksums (written by a featcache before "
                             "per-row checksums); rebuild the store into a new --cache to add them")
    if crc.shape != d.shape[:crc.ndim] or crc.ndim > 2:
        return (check, False, f"{crc.name} has shape {crc.shape}, expected {d.shape[:crc.ndim]}: the store is damaged")
    bad, errors = bad_rows(d, crc)
    if not bad.size:
        return (check, True, f"{d.shape[0]} rows ok")
    shown = ", ".join(f"{r} ({ids[r]})" if r < len(ids) else str(r) for r in bad[:5].tolist())
    more = f" and {bad.size - 5} more" if bad.size > 5 else ""
    return (check, False, f"{bad.size} of {d.shape[0]} rows of {d.name} do not match their CRC-32: rows {shown}{more}"
                          + (f"; {errors[0]}" if errors else "")
                          + "; the file is damaged: restore it from a copy or rebuild this dataset into a new --cache")


def _reencode(ds, key, info, sample, root, device, seed, atol, trust_plugins=False):
    check = f"{ds.name}/{key}: {min(sample, len(ds))} re-encoded match"  # what is really re-encoded
    root = Path(root or ds.root)
    if not root.exists():
        return (check, None, f"not checked: dataset root {root} not found (pass --root)")
    try:
        # The spec is whatever the store's writer put there: a plug-in is imported only on --trust-plugins.
        enc = create_encoder(info["spec"], device=device, trust_plugins=trust_plugins,
                             source=f"{ds.store.path} (attribute 'spec' of /datasets/{ds.name}/encoders/{key})",
                             preprocess=preprocess_mode(info.get("metadata") or {}))
    except UntrustedSpecError as e:
        return (check, None, f"not checked: {e}")
    except Exception as e:  # noqa: BLE001 - any load failure only means "cannot check"
        return (check, None, f"not checked: cannot load encoder {info['spec']!r}: {e}")
    if fingerprint(enc.metadata) != info["fingerprint"]:
        return (check, False, f"encoder {info['spec']!r} now has fingerprint {fingerprint(enc.metadata)}, "
                              f"store has {info['fingerprint']}")
    manifest = manifest_from_record(ds.attrs["manifest"])
    items = {it.id: it for it in list_items(manifest, root, on_error="skip").items}
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(ds), size=min(sample, len(ds)), replace=False))
    stored = ds.features(key, rows)
    try:
        pix = [enc.preprocess(load_image(items[i].path, items[i].box)) for i in ds.ids[rows]]
    except (KeyError, ImageError) as e:
        return (check, False, f"sample image no longer readable: {e}")
    fresh = encode_views(enc, torch.stack(pix), torch.device(device))
    if info.get("compute_precision", "fp32") != "fp32":
        atol = max(atol, 2e-2)  # stored features came from a half-precision GPU pass
    err = float(np.abs(fresh - stored).max())
    scale = float(np.abs(stored).max()) or 1.0
    return (check, err <= atol * max(1.0, scale), f"max abs diff {err:.2e} (scale {scale:.2e})")
