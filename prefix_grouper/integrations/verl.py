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

* The v1 trainer's ``PPOTrainer._balance_batch``, which reorders single samples over
  data-parallel ranks, is wrapped (when its module is imported): with
  ``use_prefix_grouper=True`` it places whole groups (samples whose TransferQueue keys
  share the prompt uid) on the ranks, the same number per rank, token workloads balanced.

Refused loudly, never ignored: Ulysses sequence parallelism (it bypasses custom attention),
fused kernels, multi-modal inputs, 3-D (mrope) position ids, per-sample temperatures,
batches whose groups are not whole or not all of ``rollout.n`` completions. A failed
activation raises from the actor config, since verl logs a plugin that fails to load only
at debug level. Micro-batches hold whole groups (``force_group_size``) and, as verl's
FSDP engine does, every rank runs the same number of them (FSDP2 hangs otherwise).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

import torch

from ..layout import GroupLayout
from ..logprobs.tokens import token_log_probs
from ..models.packed import packed_forward

__all__ = ["ENGINE_FLAG", "PrefixGrouperFSDPEngine", "activate", "balanced_group_order", "group_sizes_of",
           "micro_batch_layout", "patch_trainer", "prompt_lengths", "sequence_values"]

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
    output, packed = packed_forward(model, module, layout, prompts, completions, backend,
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
                         f"with one prompt on every rank and in every mini-batch, got group sizes {sizes}: make "
                         f"data.train_batch_size and actor.ppo_mini_batch_size (prompts) divisible by the "
                         f"data-parallel size, and keep every prompt's rollout.n samples (no filtering, one "
                         f"trajectory per sample)")


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


# ---------------------------------------------------------------------- the trainer's balancing
def balanced_group_order(keys: list, seq_lens: list[int], dp_size: int, group_size: int) -> list[int]:
    """Sample order giving every data-parallel rank (an equal, contiguous slice) whole groups.

    Samples are grouped by prompt uid, the part of their TransferQueue key
    (``{uid}_{session}_{index}``) before the first ``_``; each rank gets ``groups / dp_size``
    groups, chosen greedily (heaviest group first, to the least loaded rank with room) to
    balance the ranks' token counts. A group keeps its samples in their order.
    """
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(str(key).split("_", 1)[0], []).append(i)
    sizes = sorted({len(members) for members in groups.values()})
    if sizes != [group_size]:
        raise ValueError(f"use_prefix_grouper=True needs every prompt's rollout.n={group_size} samples in the batch, "
                         f"got groups of {sizes} samples")
    if len(groups) % dp_size:
        raise ValueError(f"use_prefix_grouper=True needs the {len(groups)} prompts of a step to divide by the "
                         f"data-parallel size {dp_size}, so that every rank holds whole groups")
    members = list(groups.values())
    tokens = [sum(seq_lens[i] for i in m) for m in members]
    per_rank, ranks, loads = len(members) // dp_size, [[] for _ in range(dp_size)], [0] * dp_size
    for g in sorted(range(len(members)), key=lambda g: -tokens[g]):
        rank = min((r for r in range(dp_size) if len(ranks[r]) < per_rank), key=lambda r: loads[r])
        ranks[rank].append(g)
        loads[rank] += tokens[g]
    return [i for rank in ranks for g in sorted(rank) for i in members[g]]


def patch_trainer(trainer_cls) -> None:
    """Wrap ``trainer_cls._balance_batch`` (verl's v1 ``PPOTrainer``) to balance whole groups
    when ``actor_rollout_ref.actor.use_prefix_grouper`` is set (idempotent)."""
    original = trainer_cls._balance_batch
    if getattr(original, "prefix_grouper_hook", False):
        return

    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        if not self.config.actor_rollout_ref.actor.get("use_prefix_grouper", False):
            return original(self, batch, metrics, logging_prefix=logging_prefix, keep_minibatch=keep_minibatch)
        workers = self.actor_rollout_wg
        if "actor" not in workers._dispatch_info:
            workers._dispatch_info["actor"] = workers._query_dispatch_info("actor")
        dp_size = max(workers._dispatch_info["actor"]) + 1
        multiple = self._get_required_batch_multiple(dp_size)
        if len(batch) % multiple:
            # verl would append synthetic samples, which form no group of rollout.n.
            raise ValueError(f"use_prefix_grouper=True: the batch of {len(batch)} samples must divide by {multiple} "
                             f"(data-parallel size and mini-batch samples) without synthetic padding samples")
        order = balanced_group_order(batch.keys, [tag["seq_len"] for tag in batch.tags], dp_size,
                                     int(self.config.actor_rollout_ref.rollout.n))
        batch.reorder(order)
        return batch

    _balance_batch.prefix_grouper_hook = True
    trainer_cls._balance_batch = _balance_batch


_TRAINER_MODULE = "verl.trainer.ppo.v1.trainer_base"


class _PatchTrainerOnImport(importlib.abc.MetaPathFinder):
    """Patches verl's v1 trainer when its module is first imported (the plugin loads with
    ``import verl``, before the trainer, which it should not import itself)."""

    def find_spec(self, name, path, target=None):
        if name != _TRAINER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch_trainer(module.PPOTrainer)

        spec.loader.exec_module = exec_and_patch
        return spec


def install_trainer_hook() -> None:
    if _TRAINER_MODULE in sys.modules:
        patch_trainer(sys.modules[_TRAINER_MODULE].PPOTrainer)
    elif not any(isinstance(finder, _PatchTrainerOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchTrainerOnImport())


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
        install_trainer_hook()
    except Exception as error:  # recorded for on_actor_config, and said loudly now
        _state["error"] = error
        _log.error("prefix_grouper's verl plugin failed to load (use_prefix_grouper=True will not work): %r", error)


_load_plugin()
