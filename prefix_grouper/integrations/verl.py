"""verl 0.9.1: ``actor_rollout_ref.actor.use_prefix_grouper=True`` in the v1 trainer's FSDP engine.

In verl 0.9.1 that switch only changes the v0 trainer's batch balancing; the training
engine never reads it. Installed with the ``verl`` extra, this module is a ``verl.plugins``
entry point, loaded by ``import verl`` in the driver and in every Ray worker. On load it
only wraps ``ActorConfig.__post_init__``; an actor config built with
``use_prefix_grouper=True`` then activates the integration in that process:

* :class:`PrefixGrouperFSDPEngine` (a subclass of verl's ``FSDPEngineWithLMHead``) is
  registered with ``EngineRegistry`` for ``language_model`` on fsdp/fsdp2 and this
  platform's device and vendor. Engines whose config was not marked by such an actor
  config behave exactly as verl's (critic, reference, ``use_prefix_grouper=False``).
* The actor's engine config is marked with the group size (``rollout.n``). Its engine
  then runs each micro-batch as one packed row per group (every prompt once, then its
  completions) with :func:`prefix_grouper.prefix_attention`, and returns verl's
  per-token log-probs (and entropies) on the unpadded sequences.

Launch: ``actor_rollout_ref.actor.use_prefix_grouper=True trainer.balance_batch=False`` (the
v1 trainer's balancing reorders single samples over ranks and would split groups; without
it each rank gets a contiguous slice of whole groups when the prompts per step divide by
the data-parallel size).

Refused loudly, never ignored: Ulysses sequence parallelism (it bypasses custom attention),
fused kernels, multi-modal inputs, 3-D (mrope) position ids, per-sample temperatures,
batches whose groups are not whole or not all of ``rollout.n`` completions. A failed
activation raises from the actor config, since verl logs a plugin that fails to load only
at debug level. Micro-batches hold whole groups (``force_group_size``) and, as verl's
FSDP engine does, every rank runs the same number of them (FSDP2 hangs otherwise).
"""
from __future__ import annotations

import logging

import torch

from ..layout import GroupLayout
from .transformers import token_log_probs
from .transformers.forward import _packed_forward

__all__ = ["ENGINE_FLAG", "PrefixGrouperFSDPEngine", "activate", "group_sizes_of", "micro_batch_layout",
           "prompt_lengths", "sequence_values"]

ENGINE_FLAG = "prefix_grouper_group_size"  # set on the actor's engine config: rollout.n
_log = logging.getLogger(__name__)
_state = {"engine": None, "error": None}
PrefixGrouperFSDPEngine = None  # the engine class, defined by activate() (it subclasses verl's)


# ---------------------------------------------------------------------- micro-batch <-> layout
def prompt_lengths(micro_batch) -> list[int]:
    """Prompt tokens of every sample: ``prompts`` nested, or the prompt columns of ``attention_mask``."""
    prompts = micro_batch["prompts"]
    if prompts.is_nested:
        return prompts.offsets().diff().tolist()
    return micro_batch["attention_mask"][:, :prompts.shape[1]].sum(1).tolist()


def group_sizes_of(sequences: list[torch.Tensor], prompt_lens: list[int]) -> list[int]:
    """Consecutive samples with the same prompt tokens form a group: their sizes, in order."""
    sizes: list[int] = []
    for i, (seq, p) in enumerate(zip(sequences, prompt_lens)):
        prev = i - 1
        same = (i > 0 and prompt_lens[prev] == p and torch.equal(sequences[prev][:p], seq[:p]))
        if same:
            sizes[-1] += 1
        else:
            sizes.append(1)
    return sizes


def micro_batch_layout(input_ids: torch.Tensor, prompt_lens: list[int]):
    """``(layout, prompts, completions)`` of a micro-batch of unpadded sequences.

    ``input_ids`` is verl's nested ``[samples, j]`` (prompt then response, no padding);
    ``prompts`` holds one prompt tensor per group, ``completions`` one response per sample.
    """
    sequences = list(input_ids.unbind())
    for i, (seq, p) in enumerate(zip(sequences, prompt_lens)):
        if not 1 <= p <= seq.shape[0]:
            raise ValueError(f"sample {i}: prompt length {p} outside its sequence of {seq.shape[0]} tokens")
    sizes = group_sizes_of(sequences, prompt_lens)
    firsts = [sum(sizes[:b]) for b in range(len(sizes))]
    prompts = [sequences[f][:prompt_lens[f]] for f in firsts]
    completions = [seq[p:] for seq, p in zip(sequences, prompt_lens)]
    suffix, start = [], 0
    for g in sizes:
        suffix.append([c.shape[0] for c in completions[start:start + g]])
        start += g
    layout = GroupLayout.from_lengths([p.shape[0] for p in prompts], suffix, device=input_ids.device)
    return layout, prompts, completions


def sequence_values(per_token: torch.Tensor, layout: GroupLayout, prompt_lens: list[int],
                    sequence_lens: list[int]) -> torch.Tensor:
    """Completion-token values (``[num_completion_tokens]``, completion after completion) on
    verl's unpadded axis (``[sum(sequence_lens)]``): the value predicting token ``t + 1``
    at ``t``, as verl's rolled log-probs; zeros where no completion token is predicted."""
    device = per_token.device
    starts = torch.tensor(sequence_lens, device=device).cumsum(0) - torch.tensor(sequence_lens, device=device)
    first = starts + torch.tensor(prompt_lens, device=device) - 1  # predicts each completion's first token
    lens = layout.suffix_lens.to(device)
    owner = torch.repeat_interleave(torch.arange(len(sequence_lens), device=device), lens,
                                    output_size=per_token.shape[0])
    offset = torch.arange(per_token.shape[0], device=device) - (lens.cumsum(0) - lens)[owner]
    out = per_token.new_zeros(sum(sequence_lens))
    return out.index_copy(0, first[owner] + offset, per_token)


def grouped_log_probs(model, module, micro_batch, temperature: float, calculate_entropy: bool,
                      backend: str = "auto"):
    """verl's ``(log_probs, entropy or None)``, nested like ``micro_batch["input_ids"]``, from
    one packed forward of ``module`` (``model`` or its FSDP wrapper) per micro-batch."""
    input_ids = micro_batch["input_ids"]
    prompt_lens = prompt_lengths(micro_batch)
    layout, prompts, completions = micro_batch_layout(input_ids, prompt_lens)
    output, packed = _packed_forward(model, module, layout, prompts, completions, backend,
                                     logits_to_keep=layout.completion_logit_positions())
    logits, targets = output.logits[0], packed[layout.completion_positions()]
    values = token_log_probs(logits, targets, temperature, return_entropy=calculate_entropy)
    log_probs, entropy = values if calculate_entropy else (values, None)
    sequence_lens = input_ids.offsets().diff().tolist()
    cu = input_ids.offsets()

    def nested(x):
        return torch.nested.nested_tensor_from_jagged(sequence_values(x, layout, prompt_lens, sequence_lens), cu)

    return nested(log_probs), (nested(entropy) if entropy is not None else None)


# ---------------------------------------------------------------------- checks
def check_whole_groups(micro_batch_or_data, group_size: int) -> None:
    """Every group of this rank's batch holds ``group_size`` samples (``rollout.n``)."""
    sizes = group_sizes_of(list(micro_batch_or_data["input_ids"].unbind()), prompt_lengths(micro_batch_or_data))
    if any(s != group_size for s in sizes):
        raise ValueError(f"use_prefix_grouper=True needs whole groups of rollout.n={group_size} consecutive samples "
                         f"with one prompt on every rank, got group sizes {sizes}: set trainer.balance_batch=False "
                         f"(verl 0.9.1's v1 trainer balances single samples over ranks, splitting groups) and make "
                         f"data.train_batch_size (prompts per step) divisible by the data-parallel size")


def check_engine_config(engine_config) -> None:
    """Refuse engine settings under which grouped attention cannot run."""
    sp = getattr(engine_config, "ulysses_sequence_parallel_size", 1) or 1
    if sp > 1:
        raise ValueError(f"use_prefix_grouper=True with ulysses_sequence_parallel_size={sp}: Ulysses sequence "
                         f"parallelism replaces the attention and would silently bypass prefix attention; set it to 1")


def check_micro_batch(micro_batch, temperature) -> float:
    """The micro-batch's single temperature; refuses what grouped log-probs do not compute."""
    from verl.utils import tensordict_utils as tu

    for key in ("use_fused_kernels", "distillation_use_topk", "calculate_sum_pi_squared"):
        if tu.get_non_tensor_data(data=micro_batch, key=key, default=False):
            raise ValueError(f"use_prefix_grouper=True does not support {key}=True")
    if micro_batch.get("multi_modal_inputs", None) is not None:
        raise ValueError("use_prefix_grouper=True does not support multi-modal inputs")
    if micro_batch["position_ids"].dim() == 3:
        raise ValueError("use_prefix_grouper=True does not support 3-D (mrope) position ids")
    if isinstance(temperature, torch.Tensor):
        if not bool((temperature == temperature.reshape(-1)[0]).all()):
            raise ValueError("use_prefix_grouper=True needs one temperature for the whole micro-batch")
        temperature = float(temperature.reshape(-1)[0])
    return float(temperature)


# ---------------------------------------------------------------------- the engine
def _device() -> tuple:
    """``(device id, device type)`` of this worker, as verl's engines place micro-batches."""
    from verl.utils.device import get_device_id, get_device_name

    return get_device_id(), get_device_name()


def _define_engine():
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine import FSDPEngineWithLMHead
    from verl.workers.engine.utils import detach_tree

    class Engine(FSDPEngineWithLMHead):
        """verl's FSDP LM engine; with a marked engine config, grouped micro-batches."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.prefix_group_size = getattr(self.engine_config, ENGINE_FLAG, None)
            if self.prefix_group_size is not None:
                check_engine_config(self.engine_config)

        def forward_backward_batch(self, data, loss_function, forward_only=False):
            if self.prefix_group_size is not None:
                check_whole_groups(data, self.prefix_group_size)
                # Micro-batches of whole groups; verl keeps their count equal over ranks.
                tu.assign_non_tensor(data, force_group_size=self.prefix_group_size)
            return super().forward_backward_batch(data, loss_function, forward_only)

        def forward_step(self, micro_batch, loss_function, forward_only):
            if self.prefix_group_size is None:
                return super().forward_step(micro_batch, loss_function, forward_only)
            device_id, device_type = _device()
            micro_batch = micro_batch.to(device_id)
            temperature = check_micro_batch(micro_batch, micro_batch["temperature"])
            calculate_entropy = tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False)
            model = getattr(self.module, "module", self.module)  # FSDP1 wraps, FSDP2 does not
            autocast_dtype = getattr(self, "_autocast_dtype", torch.bfloat16)
            with torch.autocast(device_type=device_type, dtype=autocast_dtype,
                                enabled=autocast_dtype != torch.float32):
                log_probs, entropy = grouped_log_probs(model, self.module, micro_batch, temperature,
                                                       calculate_entropy)
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
    global PrefixGrouperFSDPEngine
    if _state["engine"] is None:
        from verl.utils.device import get_device_name, get_vendor
        from verl.workers.engine import EngineRegistry

        engine = _define_engine()
        EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device=get_device_name(),
                                vendor=get_vendor())(engine)
        _state["engine"] = PrefixGrouperFSDPEngine = engine
    return _state["engine"]


def on_actor_config(config) -> None:
    """Called after ``ActorConfig.__post_init__``: with ``use_prefix_grouper=True``, activate
    (raising what failed) and mark the actor's engine config with ``rollout.n``."""
    if not getattr(config, "use_prefix_grouper", False):
        return
    if _state["error"] is not None:
        raise RuntimeError(f"actor.use_prefix_grouper=True but prefix_grouper's verl plugin failed to load: "
                           f"{_state['error']!r}") from _state["error"]
    try:
        activate()
    except Exception as error:
        raise RuntimeError(f"actor.use_prefix_grouper=True but prefix_grouper's verl engine could not be "
                           f"registered: {error!r}") from error
    check_engine_config(config.engine)
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


def _load_plugin() -> None:
    """The entry point's work: never raises (verl would hide it), records what failed."""
    try:
        install_config_hook()
    except Exception as error:  # recorded for on_actor_config, and said loudly now
        _state["error"] = error
        _log.error("prefix_grouper's verl plugin failed to load (use_prefix_grouper=True will not work): %r", error)


_load_plugin()
