"""K models of one architecture as ONE module: the building block of maskfer.parallel.

Each Conv2d(in, out, groups=g) of the K backbones becomes one Conv2d(K*in, K*out, groups=K*g)
(the first conv, which reads the shared image, becomes Conv2d(3, K*out)); each BatchNorm2d(C)
becomes BatchNorm2d(K*C), so every model keeps its own running statistics; each Linear becomes a
batched matmul with weights (K, out, in). That is why grouped convolutions are used rather than
torch.func.vmap: BatchNorm's in-place running-stat updates do not survive vmap. On CPU, where
grouped convolutions measured slower than K separate ones, the "loop" layout keeps K separate
backbones and stacks only the heads. Stacking and unstacking are exact (tests/test_parallel.py).

Design: one fused module (grouped convolutions), not ``torch.func.vmap``
------------------------------------------------------------------------
The K models are fused into ONE ordinary ``nn.Module`` (:class:`StackedModel`) whose tensors
carry the K models side by side along the channel axis ("channel-concatenated layout"):

* the backbone's first Conv2d(3, out) receives the shared image batch and becomes
  Conv2d(3, K*out) with the K weight tensors concatenated along dim 0: one GEMM with K*out
  outputs reads the image once (cheaper than repeating the batch to (B, 3K, S, S));
* every other Conv2d(in, out, groups=g) becomes Conv2d(K*in, K*out, groups=K*g), so block k of
  the output depends only on block k of the input (model k's own channels);
* every BatchNorm2d(C) becomes BatchNorm2d(K*C): BN is per channel, so each model keeps its
  own batch statistics and its own running mean/var, updated in place as usual;
* every Linear(in, out) becomes :class:`StackedLinear` (weights (K*out, in), one ``baddbmm``),
  or a plain Linear(in, K*out) where the input is shared (the linear probe's features);
* parameter-free modules (ReLU, pooling, residual adds, flatten) are channel-agnostic and
  run unchanged, so the backbone's own ``forward`` drives the fused network.

Why not ``torch.func.stack_module_state`` + ``vmap(functional_call)``: (1) vmap's batching rule
for a convolution with batched weights IS a grouped convolution (the model axis is folded into
``groups``), so it would run the same kernels with extra indirection; (2) BatchNorm updates its
running statistics in place during the forward; under vmap the stacked buffers must be passed
in, updated and written back each step, and the documented functorch recipe for BN
(``replace_all_batch_norm_modules_``) simply stops tracking them, which changes the model;
(3) the fused module is an ordinary ``nn.Module``: ordinary Adam over its parameters,
ordinary state dict, no functional plumbing. Every stacked tensor keeps the MaskModel key name
with the K slices along dim 0: unstacking is slicing, one Adam over the stack is exactly K
independent Adams (Adam is elementwise; lr, weight decay and gamma are shared fields), and
with K = 1 it IS the sequential model (same modules, same kernels), so a K = 1 group
reproduces a lone run bit for bit on CPU (tests check it).

Two backbone layouts, same everything else (``train_parallel(layout=...)``):

* ``"grouped"`` (default on CUDA): the fused network above. It turns K small kernel launches per
  layer into one wide one, which is what fills a GPU.
* ``"loop"`` (default on CPU): the K backbones stay separate modules, called one after another
  on the shared batch inside the one step; mask map, sigmoid, classifier, loss, drop and
  optimizer stay fused and vectorised. Reason, measured on this project's CPU (oneDNN 3.12,
  torch 2.13, resnet18, 112 px, batch 32, K = 8, one thread): a grouped convolution forward +
  backward took ~1.75x the time of the K ordinary convolutions it replaces (17.6 s vs
  10.0 s per step), and channels-last or the non-oneDNN path did not help; end to end
  (benchmarks/sweep_parallel.py) grouped ran at 0.65x the sequential runs, loop at 1.00x. A CPU has no idle
  parallelism for the wide kernel to use, so there the group saves the repeated data
  pipeline and per-run overhead and runs the convolutions as fast as the sequential runs.
  Each model then computes exactly what it computes alone (bitwise), BN included.

Per-model switches, all vectorised over K (no Python loop over models, samples, channels or
classes in the step): ``lam``/``beta`` are (K,) weights (0 where a model turns the loss off),
``sigmoid`` is ``where(sigmoid_k, sigmoid(M), M)``, and channel drop draws uniform scores in
the grouped (rows, K, L, g_max) layout and zeroes each group's d_k lowest-scoring real slots
(:func:`per_model_keep`); ``drop_mode`` may differ per model (a "batch" model uses row 0 of
the draw for every sample). The per-model losses are summed and backpropagated once; the
models share no parameter, so their gradients do not interact.

"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from maskfer.model import BaselineModel, LinearProbe, MaskModel



def _chunk(t: torch.Tensor, k_total: int, k: int) -> torch.Tensor:
    """Model k's slice of a stacked tensor (0-d tensors, e.g. BN's batch counter, are shared)."""
    if t.dim() == 0:
        return t
    return t.view(k_total, t.shape[0] // k_total, *t.shape[1:])[k]


def _cat(ts: list[torch.Tensor], what: str) -> torch.Tensor:
    if ts[0].dim() == 0:
        if any(not torch.equal(t.cpu(), ts[0].cpu()) for t in ts[1:]):
            raise ValueError(f"cannot stack {what}: the models' values differ ({[t.item() for t in ts]})")
        return ts[0].clone()
    return torch.cat(ts, 0)


class StackedLinear(nn.Module):
    """K independent Linear(in, out) on channel-concatenated input (..., K*in) -> (..., K*out).

    ``weight`` (K*out, in) and ``bias`` (K*out,) hold model k's rows at k*out:(k+1)*out, the
    same layout as the stacked convolutions. K = 1 is exactly ``F.linear``.
    """

    def __init__(self, k: int, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.k, self.in_features, self.out_features = k, in_features, out_features
        self.weight = nn.Parameter(torch.empty(k * out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(k * out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.k == 1:
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        xk = x.reshape(-1, self.k, self.in_features).transpose(0, 1)                      # (K, N, in)
        w = self.weight.view(self.k, self.out_features, self.in_features).transpose(1, 2)  # (K, in, out)
        if self.bias is None:
            y = torch.bmm(xk, w)
        else:
            y = torch.baddbmm(self.bias.view(self.k, 1, self.out_features), xk, w)
        return y.transpose(0, 1).reshape(*lead, self.k * self.out_features)

    def extra_repr(self) -> str:
        return f"k={self.k}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _stack_conv(convs: list[nn.Conv2d], shared_input: bool) -> nn.Conv2d:
    c, k = convs[0], len(convs)
    if shared_input and c.groups != 1:
        raise NotImplementedError("the backbone's input convolution must have groups=1 to be stacked")
    new = nn.Conv2d(c.in_channels * (1 if shared_input else k), c.out_channels * k, c.kernel_size, c.stride,
                    c.padding, c.dilation, groups=c.groups * (1 if shared_input else k), bias=c.bias is not None,
                    padding_mode=c.padding_mode, device=c.weight.device, dtype=c.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(torch.cat([m.weight for m in convs]))
        if c.bias is not None:
            new.bias.copy_(torch.cat([m.bias for m in convs]))
    return new


def _stack_bn(bns: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    b, k = bns[0], len(bns)
    ref = b.weight if b.affine else b.running_mean
    new = nn.BatchNorm2d(b.num_features * k, b.eps, b.momentum, b.affine, b.track_running_stats,
                         device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(b, name) is not None:
                getattr(new, name).copy_(torch.cat([getattr(m, name) for m in bns]))
        if b.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(_cat([m.num_batches_tracked for m in bns], "BatchNorm batch counters"))
    return new


def _stack_linear(lins: list[nn.Linear], shared_input: bool) -> nn.Module:
    lin, k = lins[0], len(lins)
    if shared_input:  # one Linear(in, K*out) reads the shared input once
        new = nn.Linear(lin.in_features, k * lin.out_features, lin.bias is not None,
                        device=lin.weight.device, dtype=lin.weight.dtype)
    else:
        new = StackedLinear(k, lin.in_features, lin.out_features, lin.bias is not None,
                            device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(torch.cat([m.weight for m in lins]))
        if lin.bias is not None:
            new.bias.copy_(torch.cat([m.bias for m in lins]))
    return new


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def unsupported_for_grouping(module: nn.Module, shared_input: bool = True) -> str | None:
    """Why ``module`` cannot be fused by :func:`stack_modules` (None when it can)."""
    supported = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
    first_conv = shared_input
    for name, m in module.named_modules():
        if isinstance(m, supported):
            if first_conv and isinstance(m, nn.Conv2d):
                if m.groups != 1:
                    return f"{name}: the input convolution has groups={m.groups}"
                first_conv = False
            elif first_conv and name:
                return f"{name}: a {type(m).__name__} before the first convolution would see the shared input"
        elif any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            return (f"module {name or '(root)'} of type {type(m).__name__} has parameters or buffers; only Conv2d, "
                    "BatchNorm2d and Linear layers are fused")
    return None


def stack_modules(modules: list[nn.Module], shared_input: bool = False) -> nn.Module:
    """A copy of ``modules[0]`` whose Conv2d / BatchNorm2d / Linear leaves hold all K modules' weights.

    ``shared_input``: the module's input is the same for every model (images for a backbone,
    features for a linear probe): its FIRST Conv2d (in registration order, the stem of every
    registered backbone) or a top-level Linear then reads that input once.
    Raises NotImplementedError when :func:`unsupported_for_grouping` names a reason.
    """
    supported = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
    if isinstance(modules[0], supported):
        return _stack_leaf(modules, "", shared_input)
    reason = unsupported_for_grouping(modules[0], shared_input)
    if reason:
        raise NotImplementedError(f"cannot fuse {type(modules[0]).__name__} with grouped convolutions: {reason} "
                                  "(use layout='loop')")
    stacked = copy.deepcopy(modules[0])
    first_conv = shared_input
    for name, m in list(stacked.named_modules()):
        if isinstance(m, supported):
            peers = [mod.get_submodule(name) for mod in modules]
            shared = first_conv and isinstance(m, nn.Conv2d)
            first_conv = first_conv and not shared
            _set_submodule(stacked, name, _stack_leaf(peers, name, shared))
    return stacked


def _stack_leaf(peers: list[nn.Module], name: str, shared_input: bool) -> nn.Module:
    m = peers[0]
    if isinstance(m, nn.Conv2d):
        new = _stack_conv(peers, shared_input)
    elif isinstance(m, nn.BatchNorm2d):
        new = _stack_bn(peers)
    else:
        new = _stack_linear(peers, shared_input)
    new.train(m.training)
    return new


LAYOUTS = ("grouped", "loop")


def default_layout(device: torch.device | str) -> str:
    """"grouped" on accelerators, "loop" on CPU (see the module docstring for the measurement)."""
    return "loop" if torch.device(device).type == "cpu" else "grouped"


class StackedModel(nn.Module):
    """K models of one architecture (MaskModel, BaselineModel or LinearProbe) run as one module.

    ``forward(images, feats)`` takes the shared batch, images (B, 3, S, S) and features (B, C),
    and returns ``{"logits" (B, K, L)}``, plus ``"masked"`` and ``"mask"`` (B, K, C) for
    MaskModel. The mask map, sigmoid and classifier are always fused (StackedLinear). The
    backbone is fused with grouped convolutions (``layout="grouped"``: stacked tensors keep the
    model's key names, K slices along dim 0) or kept as K modules called one after another on
    the shared batch (``layout="loop"``, keys ``backbones.<k>.*``). :meth:`model_state_dict`
    and :meth:`optimizer_state` return model k's own state under the model's names and
    parameter ids; :meth:`stack_optimizer_states` is their inverse for the optimizer.
    """

    def __init__(self, models: list[nn.Module], layout: str = "grouped"):
        super().__init__()
        first = models[0]
        if len({type(m) for m in models}) != 1:
            raise ValueError("all models of a stack must be of one class")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
        self.k, self.layout = len(models), layout
        if isinstance(first, MaskModel):
            self.kind = "cafe"
        elif isinstance(first, BaselineModel):
            self.kind = "baseline"
        elif isinstance(first, LinearProbe):
            self.kind = "linear-probe"
        else:
            raise ValueError(f"cannot stack {type(first).__name__}")
        if self.kind in ("cafe", "baseline"):
            if layout == "grouped":
                self.backbone = stack_modules([m.backbone for m in models], shared_input=True)
            else:
                self.backbones = nn.ModuleList([copy.deepcopy(m.backbone) for m in models])
        if self.kind == "cafe":
            self.mask_map = stack_modules([m.mask_map for m in models])
            self.feat_dim = first.feat_dim
            self._sigmoid = [bool(m.use_sigmoid) for m in models]
            self.register_buffer("sigmoid_on", torch.tensor(self._sigmoid), persistent=False)
        self.fc = stack_modules([m.fc for m in models], shared_input=self.kind == "linear-probe")
        # --feature-norm is a data field, equal within a group: one shared copy, not K slices
        self.feat_norm = copy.deepcopy(first.feat_norm) if self.kind != "baseline" else None
        self.num_classes = first.fc.out_features
        self.train(first.training)
        # Where each of the model's tensors lives in the stack: (stacked key, sliced along dim 0?).
        self._model_keys = list(first.state_dict())
        self._model_params = [n for n, _ in first.named_parameters()]
        self._stack_params = [n for n, _ in self.named_parameters()]
        own = self.state_dict()
        missing = [mk for k in range(self.k) for mk in self._model_keys if self._source(mk, k)[0] not in own]
        extra = set(own) - {self._source(mk, k)[0] for k in range(self.k) for mk in self._model_keys}
        if missing or extra:
            raise RuntimeError(f"stack of {type(first).__name__} does not map its keys: {missing[:3]} {sorted(extra)[:3]}")
        self._contributors: dict[str, list[tuple[int, int, bool]]] = {}
        for k in range(self.k):
            for j, mk in enumerate(self._model_params):
                sk, sliced = self._source(mk, k)
                self._contributors.setdefault(sk, []).append((k, j, sliced))

    def _source(self, model_key: str, k: int) -> tuple[str, bool]:
        if model_key.startswith("feat_norm."):
            return model_key, False
        if self.layout == "loop" and model_key.startswith("backbone."):
            return f"backbones.{k}.{model_key[len('backbone.'):]}", False
        return model_key, True

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        if self.layout == "grouped":
            return self.backbone(images)                                      # (B, K*D)
        return torch.cat([bb(images) for bb in self.backbones], dim=1)         # same layout

    def forward(self, images: torch.Tensor | None, feats: torch.Tensor | None) -> dict[str, torch.Tensor]:
        k, L = self.k, self.num_classes
        if self.kind == "linear-probe":
            return {"logits": self.fc(self.feat_norm(feats)).view(feats.shape[0], k, L)}
        v = self._features(images)
        b = v.shape[0]
        if self.kind == "baseline":
            return {"logits": self.fc(v).view(b, k, L)}
        if feats.dim() != 2 or feats.shape[1] != self.feat_dim:
            raise ValueError(f"feats must be (B, {self.feat_dim}), got {tuple(feats.shape)}")
        c = self.feat_dim
        mm = self.mask_map
        if mm.kind == "identity":
            m = v.view(b, k, c)
        elif mm.kind == "pool":
            m = F.adaptive_avg_pool1d(v.view(b * k, 1, mm.in_dim), c).view(b, k, c)
        else:
            m = mm.linear(v).view(b, k, c)
        if all(self._sigmoid):
            mask = torch.sigmoid(m)
        elif not any(self._sigmoid):
            mask = m
        else:
            mask = torch.where(self.sigmoid_on.view(1, k, 1), torch.sigmoid(m), m)
        masked = mask * self.feat_norm(feats.to(mask.dtype)).unsqueeze(1)
        return {"logits": self.fc(masked.reshape(b, k * c)).view(b, k, L), "masked": masked, "mask": mask}

    def model_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Model k's state dict, with the key names of the unstacked model (views; clone to keep)."""
        own = self.state_dict()
        out = {}
        for mk in self._model_keys:
            sk, sliced = self._source(mk, k)
            out[mk] = _chunk(own[sk], self.k, k) if sliced else own[sk]
        return out

    def optimizer_state(self, opt_sd: dict, k: int) -> dict:
        """Model k's slice of the state dict of an optimizer over ``self.parameters()`` (one param
        group, elementwise state such as Adam's), with the model's own parameter ids."""
        if len(opt_sd["param_groups"]) != 1:
            raise ValueError("parallel training uses one parameter group")
        pid = {n: i for i, n in enumerate(self._stack_params)}
        state = {}
        for j, mk in enumerate(self._model_params):
            sk, sliced = self._source(mk, k)
            s = opt_sd["state"].get(pid[sk])
            if s is not None:
                state[j] = {key: (_chunk(v, self.k, k) if sliced and torch.is_tensor(v) else v) for key, v in s.items()}
        groups = copy.deepcopy(opt_sd["param_groups"])
        groups[0]["params"] = list(range(len(self._model_params)))
        return {"state": state, "param_groups": groups}

    def stack_optimizer_states(self, sds: list[dict]) -> dict:
        """K models' optimizer state dicts -> the state dict of one optimizer over the stack."""
        if len(sds) != self.k or any(len(sd["param_groups"]) != 1 for sd in sds):
            raise ValueError(f"need {self.k} optimizer states with one parameter group each")
        hyper = [{n: v for n, v in sd["param_groups"][0].items() if n != "params"} for sd in sds]
        if any(h != hyper[0] for h in hyper[1:]):
            raise ValueError("cannot stack optimizers whose hyperparameters differ")
        state = {}
        for p, sk in enumerate(self._stack_params):
            contrib = self._contributors[sk]
            parts = [sds[k]["state"].get(j) for k, j, _ in contrib]
            if all(s is None for s in parts):
                continue
            if any(s is None for s in parts) or any(s.keys() != parts[0].keys() for s in parts):
                raise ValueError(f"optimizer states of {sk} are missing or differ in kind between the models")
            state[p] = {}
            for key, v0 in parts[0].items():
                vals = [s[key] for s in parts]
                if torch.is_tensor(v0):
                    state[p][key] = _cat(vals, f"optimizer state {sk}.{key}") if contrib[0][2] else v0.clone()
                elif any(v != v0 for v in vals):
                    raise ValueError(f"cannot stack optimizer state {sk}.{key}: values differ ({vals})")
                else:
                    state[p][key] = v0
        groups = copy.deepcopy(sds[0]["param_groups"])
        groups[0]["params"] = list(range(len(self._stack_params)))
        return {"state": state, "param_groups": groups}
