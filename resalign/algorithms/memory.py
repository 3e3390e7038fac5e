"""Memory levers for unlearning at Stable Diffusion scale, as small units the methods call.

The published ResAlign code runs SD v1.4 in fp32 with exact double-backward HVPs, no
gradient checkpointing and a second frozen UNet for the regularizer: about 56 GB on an A100.
Each lever here is independent, selected by ``unlearn.memory`` (:class:`MemorySpec`), and its
measured effect on memory and on the hypergradient is in ``docs/benchmarks.md``:

- :func:`autocast` / :func:`autocast_loss`: forward passes in bf16/fp16 under
  ``torch.autocast``; parameters (the "master" copy) and every gradient, HVP and hypergradient
  accumulator stay fp32 because autocast only casts op inputs, and the loss is returned in
  fp32. Departure from the paper: the paper runs everything in fp32.
- :func:`cast_frozen_weights`: the frozen base weights stored in bf16/fp16 while the trainable
  tensors (LoRA) stay fp32. Needs autocast of the same dtype (a half weight meets fp32
  activations otherwise).
- :func:`enable_gradient_checkpointing`: diffusers' block checkpointing, non-reentrant (the
  reentrant variant cannot be differentiated twice), with parameters rebound at
  recomputation (departure from diffusers, whose default is wrong under functional_call). ``torch.func`` does not support the
  saved-tensor hooks non-reentrant checkpointing is built on, so inside a ``torch.func``
  transform (the ``forward_over_reverse`` HVP backend) blocks run un-checkpointed: correct,
  but that backend then gets no memory saving from this lever.
- :func:`free_inner_state`: drop the simulated fine-tuning's optimizer moments, gradients
  and graphs before the Richardson phase, so they do not coexist with the HVP graph.
- :class:`IdleOffloader`: park modules that are idle during an outer step (VAE, text
  encoder once data are encoded) on the CPU and bring them back when needed.
- :func:`frozen_original`: the frozen original model is the base model with its LoRA
  adapters disabled (peft), shared by the regularizer and the ESD target; no second UNet.

HVPs restricted to the trainable parameters need no lever: ``make_hvp`` is called with the
LoRA tensors only, so the Hessian never touches the ~860M frozen weights.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterable, Iterator, MutableMapping, MutableSequence
from typing import Any

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HALF_DTYPES = (torch.bfloat16, torch.float16)
FROZEN_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def autocast(mode: str, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """Context for forward passes: ``mode`` ``"none"`` (fp32, a no-op), ``"bf16"`` or
    ``"fp16"`` autocast on ``device``'s type. Parameters are not cast in place, so the
    parameters and the gradients autograd produces for them stay in their own (fp32) dtype."""
    if mode == "none":
        return contextlib.nullcontext()
    if mode not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast mode must be none, bf16 or fp16, got {mode!r}")
    return torch.autocast(device_type=_device_type(device), dtype=AUTOCAST_DTYPES[mode])


def autocast_loss(
    loss_fn: Callable[..., torch.Tensor], mode: str, device: torch.device | str
) -> Callable[..., torch.Tensor]:
    """Wrap ``loss_fn`` so that its forward runs under :func:`autocast` and the scalar it
    returns is fp32 (reductions of half values lose digits; the caller differentiates an fp32
    scalar, so gradients, HVPs and their accumulation are fp32). ``mode == "none"`` returns
    ``loss_fn`` unchanged."""
    if mode == "none":
        return loss_fn

    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        with autocast(mode, device):
            value = loss_fn(*args, **kwargs)
        return value.float()

    return wrapped


def _widen(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in HALF_DTYPES else t


def squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error written out (``torch.func.jvp`` over ``grad`` fails on
    ``F.mse_loss``); half-precision inputs are upcast to fp32 before the reduction, fp32 and
    fp64 inputs keep their dtype (float64 tests stay float64)."""
    diff = _widen(prediction) - _widen(target)
    return (diff * diff).mean()


def cast_frozen_weights(module: torch.nn.Module, dtype: torch.dtype | str) -> int:
    """Store every parameter of ``module`` that does not require grad, and every floating
    buffer, in ``dtype``; trainable parameters keep their dtype (fp32 masters). Returns the
    number of bytes saved. Use with autocast of the same dtype."""
    if isinstance(dtype, str):
        dtype = FROZEN_DTYPES[dtype]
    saved = 0
    for p in module.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            before = p.numel() * p.element_size()
            p.data = p.data.to(dtype)
            saved += before - p.numel() * p.element_size()
    for sub in module.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                sub._buffers[name] = buf.to(dtype)
    return saved


def _in_functorch_transform() -> bool:
    return torch._C._functorch.maybe_current_level() is not None


def _checkpoint_call(module: Callable[..., Any], *args: Any) -> Any:
    # torch.func raises on saved-tensor hooks, which non-reentrant checkpointing needs; run the
    # block plainly there (correct, no saving) and checkpoint everywhere else.
    if _in_functorch_transform():
        return module(*args)
    # The recomputation runs during backward, after torch.func.functional_call has put the
    # module's own parameters back: without rebinding, a block would be recomputed with θ
    # instead of the substituted θ* and the gradient would be silently wrong (measured: 119%
    # relative error on a tiny UNet's HVP with diffusers' default checkpointing function).
    assert isinstance(module, torch.nn.Module)
    bound = dict(module.named_parameters(remove_duplicate=False))
    bound.update(module.named_buffers(remove_duplicate=False))

    def run(*inner: Any) -> Any:
        return torch.func.functional_call(module, bound, inner, strict=False)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn on diffusers' block-level gradient checkpointing with non-reentrant
    ``torch.utils.checkpoint`` (recomputation that autograd can differentiate again, so double
    backward HVPs stay exact). Each block's recomputation rebinds the tensors that were bound
    at forward time, so it is correct under ``torch.func.functional_call`` (diffusers' own
    ``enable_gradient_checkpointing()`` recomputes with the module's parameters instead). Blocks check ``torch.is_grad_enabled()``: no-grad forwards (the
    frozen original's targets) are unaffected. Inside ``torch.func`` transforms blocks run
    un-checkpointed (see the module docstring)."""
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    model.enable_gradient_checkpointing(gradient_checkpointing_func=_checkpoint_call)


def disable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Undo :func:`enable_gradient_checkpointing`."""
    model.disable_gradient_checkpointing()


def _lora_layers(model: torch.nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def frozen_original(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The frozen original model: ``model`` with its LoRA adapters disabled for the duration
    of the block (peft's ``disable_adapter`` for a ``PeftModel``; the adapter layers' own
    switch for a diffusers model carrying peft adapters). Every forward inside sees the base
    weights only, so the regularizer's and ESD's targets need no second copy of the UNet.
    Calls under ``torch.no_grad()`` are the caller's choice (targets are constants)."""
    if hasattr(model, "disable_adapter") and callable(model.disable_adapter):
        with model.disable_adapter():
            yield model
        return
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(
            "frozen_original needs a model carrying peft LoRA adapters; without them the "
            "model is its own frozen original only if nothing is trained in place"
        )
    states = [layer.disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield model
    finally:
        for layer, was_disabled in zip(layers, states):
            layer.enable_adapters(not was_disabled)


def _clear(obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        if obj.grad is not None:
            obj.grad = None
        return
    if isinstance(obj, torch.nn.Module):
        obj.zero_grad(set_to_none=True)
        return
    if isinstance(obj, torch.optim.Optimizer):
        obj.state.clear()
        obj.zero_grad(set_to_none=True)
        return
    if isinstance(obj, MutableMapping):
        for value in obj.values():
            _clear(value)
        obj.clear()
        return
    if isinstance(obj, MutableSequence):
        for value in obj:
            _clear(value)
        del obj[:]
        return
    if hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            if isinstance(value, MutableMapping | MutableSequence | torch.optim.Optimizer):
                _clear(value)


def free_inner_state(*states: Any, collect: bool = False) -> None:
    """Release the simulated fine-tuning's state before the Richardson phase: optimizer
    moments, gradients and any dicts/lists of tensors passed (emptied in place, so the caller's
    references no longer pin them; reference counting frees the tensors at once), then return
    cached CUDA blocks to the device. Pass only what is dead: θ*_FT itself is needed by the
    hypergradient. ``collect`` adds a full ``gc.collect()`` for reference cycles; it is off by
    default because it costs about 0.5 s per call in a process with torch, diffusers and
    mlflow loaded (measured), paid once per inner configuration."""
    for state in states:
        _clear(state)
    if collect:
        gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class IdleOffloader:
    """Parks idle modules on the CPU and brings them back to ``device`` on demand.

    ``park(m)`` moves ``m`` to the CPU (a no-op when ``device`` is the CPU, which is where the
    lever has nothing to save); ``active(m)`` is a context that brings it to ``device`` for the
    block and parks it again afterwards."""

    def __init__(self, device: torch.device | str, enabled: bool = True):
        self.device = torch.device(device)
        self.enabled = enabled and self.device.type != "cpu"

    def park(self, *modules: torch.nn.Module) -> None:
        if not self.enabled:
            return
        for module in modules:
            module.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def active(self, *modules: torch.nn.Module) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            self.park(*modules)


def apply_memory_levers(
    unet: torch.nn.Module,
    memory: Any,
    device: torch.device | str,
    idle: Iterable[torch.nn.Module] = (),
) -> IdleOffloader:
    """Apply the model-side levers of a ``MemorySpec`` to ``unet`` (after its LoRA adapters
    are added): gradient checkpointing, frozen weights in low precision; park the ``idle``
    modules when ``offload_idle``. Returns the offloader. The forward-side lever (autocast) is
    applied by the caller through :func:`autocast_loss` around each loss."""
    if memory.gradient_checkpointing:
        enable_gradient_checkpointing(unet)
    frozen = getattr(memory, "frozen_dtype", "float32")
    if frozen != "float32":
        cast_frozen_weights(unet, frozen)
    offloader = IdleOffloader(device, enabled=memory.offload_idle)
    offloader.park(*idle)
    return offloader


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory window: the CUDA allocator's peak on a GPU; on Linux CPUs the
    process's peak resident set (VmHWM), reset through ``/proc/self/clear_refs``."""
    if _device_type(device) == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def current_memory(device: torch.device | str) -> int:
    """Bytes in use now: CUDA allocated memory on a GPU, the resident set (VmRSS) of this
    process on a CPU (0 where /proc is unavailable); the base a :func:`peak_memory` is
    compared with."""
    if _device_type(device) == "cuda":
        return int(torch.cuda.memory_allocated())
    return _proc_status_bytes("VmRSS:")


def _proc_status_bytes(key: str) -> int:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_memory(device: torch.device | str) -> int:
    """Bytes at peak since :func:`reset_peak_memory`: CUDA allocator peak on a GPU, peak RSS
    (VmHWM) of this process on a CPU (0 where /proc is unavailable)."""
    if _device_type(device) == "cuda":
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    return _proc_status_bytes("VmHWM:")
