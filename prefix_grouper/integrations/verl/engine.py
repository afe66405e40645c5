"""The verl engine: :class:`PrefixGrouperFSDPEngine` (a subclass of verl's
``FSDPEngineWithLMHead``), its registration, and the actor-config hook that turns it on.

An engine whose config an actor config with ``use_prefix_grouper=True`` marked
(:data:`ENGINE_FLAG`) cuts its batches into micro-batches of packed tokens
(:mod:`.batching`) and runs each as one packed forward of its prefix tree
(:func:`~.forward.grouped_log_probs`), on one rank or over its Ulysses group. Every other
engine behaves exactly as verl's (critic, reference, ``use_prefix_grouper=False``).
"""
from __future__ import annotations

import torch

from .batching import group_count_micro_batches, token_budget_micro_batches
from .forward import grouped_log_probs
from .tree import sample_tokens, prompt_lengths

__all__ = ["ENGINE_FLAG", "activate", "check_micro_batch", "install_config_hook", "on_actor_config",
           "packed_micro_batches", "state"]

ENGINE_FLAG = "prefix_grouper_group_size"  # set on the actor's engine config: rollout.n
# The registered engine class, and what failed when the plugin loaded (raised on activation).
state = {"engine": None, "error": None}


def check_micro_batch(micro_batch, temperature) -> float:
    """The micro-batch's single temperature; refuses what grouped log-probs do not compute."""
    from verl.utils import tensordict_utils as tu

    for key in ("use_fused_kernels", "distillation_use_topk", "calculate_sum_pi_squared"):
        if tu.get_non_tensor_data(data=micro_batch, key=key, default=False):
            raise ValueError(f"use_prefix_grouper=True does not support {key}=True")
    if micro_batch.get("multi_modal_inputs", None) is not None:
        raise ValueError("use_prefix_grouper=True does not support multi-modal inputs")
    positions = micro_batch["position_ids"]
    if positions.dim() == 3:
        raise ValueError("use_prefix_grouper=True does not support 3-D (mrope) position ids")
    # The packed row takes the layout's positions (0.. along every [prompt; response]).
    offsets = micro_batch["input_ids"].offsets()
    lens = offsets.diff()
    expected = torch.arange(int(offsets[-1]), device=lens.device) - torch.repeat_interleave(offsets[:-1], lens)
    if not torch.equal(positions.values().to(expected.device), expected):
        raise ValueError("use_prefix_grouper=True needs position_ids 0, 1, ... along every sequence (the packed "
                         "row recomputes them); this micro-batch has others")
    if isinstance(temperature, torch.Tensor):
        if not bool((temperature == temperature.reshape(-1)[0]).all()):
            raise ValueError("use_prefix_grouper=True needs one temperature for the whole micro-batch")
        temperature = float(temperature.reshape(-1)[0])
    return float(temperature)


def packed_micro_batches(data, dp_group, sequence_parallel_size: int, device) -> tuple[list, list | None]:
    """verl's ``prepare_micro_batches`` for a prefix-grouper engine: ``(micro-batches, index
    lists or None)``. ``use_dynamic_bsz=True``: at most ``max_token_len_per_gpu x
    sequence_parallel_size`` packed tokens each (reordered; verl restores the order from the
    index lists); else ``micro_batch_size_per_gpu`` consecutive groups each, in order. The
    same number on every rank of ``dp_group``."""
    from verl.utils import tensordict_utils as tu

    tokens, prompt_lens = sample_tokens(data["input_ids"]), prompt_lengths(data)
    dynamic = tu.get_non_tensor_data(data=data, key="use_dynamic_bsz", default=True)
    if dynamic:
        budget = int(data["max_token_len_per_gpu"]) * sequence_parallel_size

        def plan(count):
            return token_budget_micro_batches(tokens, prompt_lens, budget, count)
    else:
        groups = int(data["micro_batch_size_per_gpu"])

        def plan(count):
            return group_count_micro_batches(tokens, prompt_lens, groups, count)
    parts = plan(1)
    if dp_group is not None and torch.distributed.is_initialized():
        count = torch.tensor([len(parts)], device=device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX, group=dp_group)
        if int(count) > len(parts):
            parts = plan(int(count))
    return [tu.index_select_tensor_dict(data, part) for part in parts], (parts if dynamic else None)


def _device() -> tuple:
    """``(device id, device type)`` of this worker, as verl's engines place micro-batches."""
    from verl.utils.device import get_device_id, get_device_name

    return get_device_id(), get_device_name()


def _define_engine():
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine import FSDPEngineWithLMHead
    from verl.workers.engine.fsdp import transformer_impl
    from verl.workers.engine.utils import detach_tree

    if not callable(getattr(transformer_impl, "prepare_micro_batches", None)):
        raise ImportError("verl.workers.engine.fsdp.transformer_impl has no prepare_micro_batches, which the "
                          "prefix-grouper engine replaces for its micro-batches (written for verl 0.9.1)")

    class Engine(FSDPEngineWithLMHead):
        """verl's FSDP LM engine; with a marked engine config, prefix-tree micro-batches."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.prefix_group_size = getattr(self.engine_config, ENGINE_FLAG, None)

        def forward_backward_batch(self, data, loss_function, forward_only=False):
            if self.prefix_group_size is None:
                return super().forward_backward_batch(data, loss_function, forward_only)
            # verl's loop owns loss normalization, gradient sync and the output order; only
            # its cut into micro-batches differs, so that one call is swapped for this batch.
            original = transformer_impl.prepare_micro_batches

            def prepare(data, dp_group=None, **_):
                return packed_micro_batches(data, dp_group, self.ulysses_sequence_parallel_size, _device()[0])

            transformer_impl.prepare_micro_batches = prepare
            try:
                return super().forward_backward_batch(data, loss_function, forward_only)
            finally:
                transformer_impl.prepare_micro_batches = original

        def forward_step(self, micro_batch, loss_function, forward_only):
            if self.prefix_group_size is None:
                return super().forward_step(micro_batch, loss_function, forward_only)
            device_id, device_type = _device()
            micro_batch = micro_batch.to(device_id)
            temperature = check_micro_batch(micro_batch, micro_batch["temperature"])
            calculate_entropy = tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False)
            model = getattr(self.module, "module", self.module)  # FSDP1 wraps, FSDP2 does not
            group = self.ulysses_parallel_group if self.ulysses_sequence_parallel_size > 1 else None
            autocast_dtype = getattr(self, "_autocast_dtype", torch.bfloat16)
            with torch.autocast(device_type=device_type, dtype=autocast_dtype,
                                enabled=autocast_dtype != torch.float32):
                log_probs, entropy = grouped_log_probs(model, self.module, micro_batch, temperature,
                                                       calculate_entropy, sequence_parallel_group=group)
                model_output = {"log_probs": log_probs}
                if entropy is not None:
                    model_output["entropy"] = entropy
                if loss_function is not None:
                    loss, metrics = loss_function(model_output=model_output, data=micro_batch,
                                                  dp_group=self.get_data_parallel_group())
                else:
                    loss, metrics = torch.tensor(1.0, device=device_type), {}
            return loss, {"model_output": detach_tree(model_output), "loss": loss.detach().item(),
                          "metrics": metrics}

    Engine.__name__ = Engine.__qualname__ = "PrefixGrouperFSDPEngine"
    return Engine


def activate() -> type:
    """Register :class:`PrefixGrouperFSDPEngine` with verl's ``EngineRegistry`` (idempotent)."""
    if state["engine"] is None:
        from verl.utils.device import get_device_name, get_vendor
        from verl.workers.engine import EngineRegistry

        engine = _define_engine()
        EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device=get_device_name(),
                                vendor=get_vendor())(engine)
        state["engine"] = engine
    return state["engine"]


def on_actor_config(config) -> None:
    """Called after ``ActorConfig.__post_init__``: with ``use_prefix_grouper=True``, activate
    (raising what failed) and mark the actor's engine config with ``rollout.n``."""
    if not getattr(config, "use_prefix_grouper", False):
        return
    if state["error"] is not None:
        raise RuntimeError(f"actor.use_prefix_grouper=True but prefix_grouper's verl plugin failed to load: "
                           f"{state['error']!r}") from state["error"]
    try:
        activate()
    except Exception as error:
        raise RuntimeError(f"actor.use_prefix_grouper=True but prefix_grouper's verl engine could not be "
                           f"registered: {error!r}") from error
    setattr(config.engine, ENGINE_FLAG, int(config.rollout_n))


def install_config_hook() -> None:
    """Wrap ``ActorConfig.__post_init__`` with :func:`on_actor_config` (idempotent)."""
    from verl.workers.config.actor import ActorConfig

    original = ActorConfig.__post_init__
    if getattr(original, "prefix_grouper_hook", False):
        return

    def __post_init__(self):
        original(self)
        on_actor_config(self)

    __post_init__.prefix_grouper_hook = True
    ActorConfig.__post_init__ = __post_init__
