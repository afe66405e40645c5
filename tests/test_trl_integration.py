"""prefix_grouper.integrations.trl.GRPOTrainer against trl.GRPOTrainer on a tiny Qwen2.

The model (float32, random weights) and a word-level tokenizer are built offline and saved
under tmp_path, so TRL loads the policy and its reference model from a local folder.

Tolerance 1e-5 on log-probs, entropies, loss and gradients: both paths score the tokens with
TRL's fused LM head (float32 statistics), on hidden states that differ only by float32
rounding: packed shared-prefix attention against padded rows whose rotary positions are
offset by the left padding. Measured: 5e-7 on log-probs, 2e-7 on entropies. The same
completions after another group's prompt change the log-probs by 1e-2 (median), so a wrong
mask or packing cannot pass. float64 cannot tighten this: TRL's head keeps its statistics
in float32 whatever the model dtype.
"""
import inspect
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from prefix_grouper.integrations.transformers import ATTENTION_NAME  # noqa: E402
from prefix_grouper.integrations.trl import (OVERRIDDEN_METHOD, TESTED_TRL_VERSION, GRPOTrainer,  # noqa: E402
                                             check_trl_override, forward_chunks)

TOL = 1e-5  # see the module docstring
WORDS = [f"w{i}" for i in range(36)]
PAD, EOS = 0, 1


def save_tiny_model(path, model_type="qwen2", **config_overrides) -> str:
    """A saved tiny causal LM of ``model_type`` and its tokenizer (vocabulary: <pad>, <eos>, <unk>, w0..w35)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                                     eos_token="<eos>", unk_token="<unk>")
    config = transformers.AutoConfig.for_model(
        model_type, **{**dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS, tie_word_embeddings=False),
                       **config_overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD, EOS
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny Qwen2 and its tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"))


def word_count_reward(completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def make_trainer(trainer_class, model_dir, tmp_path, peft_config=None, **config):
    prompts = [" ".join(WORDS[i:i + 2 + i % 5]) for i in range(8)]
    args = trl.GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, num_generations=4,
                          per_device_train_batch_size=8, max_completion_length=6, temperature=0.7,
                          beta=0.1, learning_rate=1e-3, logging_steps=1, save_strategy="no", seed=0, bf16=False,
                          **config)
    # Not AutoTokenizer: the folder's config says qwen2, whose tokenizer class would re-tokenize as BPE.
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
    return trainer_class(model=model_dir, reward_funcs=word_count_reward, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), peft_config=peft_config)


def trl_shaped_batch(seed=0, prompt_lens=(5, 2, 7)):
    """Rows as TRL scores them: 3 groups (4, 2, 3 completions) of ragged left-padded prompts,
    ragged right-padded completions (one empty: a truncated, masked completion), rows shuffled
    as TRL shuffles a generation batch before cutting micro-batches."""
    g = torch.Generator().manual_seed(seed)
    vocab = 3 + len(WORDS)
    group_completion_lens = [[3, 6, 1, 4], [6, 0], [2, 5, 6]]
    width = max(prompt_lens)
    prompt_rows, completion_rows, prompt_masks, completion_masks = [], [], [], []
    for p, completion_lens in zip(prompt_lens, group_completion_lens):
        prompt = torch.randint(3, vocab, (p,), generator=g)
        for s in completion_lens:
            prompt_rows.append(torch.cat([torch.full((width - p,), PAD), prompt]))
            prompt_masks.append(torch.arange(width) >= width - p)
            completion = torch.randint(3, vocab, (6,), generator=g)
            completion_masks.append(torch.arange(6) < s)
            completion_rows.append(torch.where(completion_masks[-1], completion, PAD))
    order = torch.randperm(len(prompt_rows), generator=g)
    input_ids = torch.cat([torch.stack(prompt_rows), torch.stack(completion_rows)], 1)[order]
    attention_mask = torch.cat([torch.stack(prompt_masks), torch.stack(completion_masks)], 1).long()[order]
    return input_ids, attention_mask, 6


def test_trl_still_has_the_overridden_method_with_our_signature():
    """Fails loudly when TRL renames the private method the drop-in overrides, or changes its
    parameters: TRL would then silently stop calling the grouped forward."""
    assert tuple(int(part) for part in trl.__version__.split(".")[:2]) == TESTED_TRL_VERSION, (
        f"trl {trl.__version__} is installed; the override was written for {TESTED_TRL_VERSION}: check "
        f"trl.GRPOTrainer.{OVERRIDDEN_METHOD} and update TESTED_TRL_VERSION")
    theirs = getattr(trl.GRPOTrainer, OVERRIDDEN_METHOD, None)
    assert theirs is not None, f"trl.GRPOTrainer has no {OVERRIDDEN_METHOD} any more: the override is dead code"
    ours = GRPOTrainer.__dict__[OVERRIDDEN_METHOD]

    def parameters(function):
        return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]

    assert parameters(theirs) == parameters(ours), (
        f"trl.GRPOTrainer.{OVERRIDDEN_METHOD}{inspect.signature(theirs)} != ours{inspect.signature(ours)}")
    check_trl_override()  # what the module runs at import passes too


def test_the_override_check_refuses_a_renamed_or_changed_method():
    class Renamed:
        def _get_per_token_logps(self, model, input_ids, attention_mask, logits_to_keep):
            pass

    class Changed:
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None):
            pass

    with pytest.raises(ImportError, match=f"has no {OVERRIDDEN_METHOD}"):
        check_trl_override(Renamed)
    with pytest.raises(ImportError, match="differs from prefix_grouper's override"):
        check_trl_override(Changed)
    with pytest.warns(UserWarning, match="tested with trl 1.16, found 1.17.0"):
        check_trl_override(version="1.17.0")


def test_forward_chunks_never_split_a_group():
    assert forward_chunks([4, 2, 3, 1], 4) == [[4], [2], [3, 1]]
    assert forward_chunks([2, 2, 6, 1], 4) == [[2, 2], [6], [1]]  # a group larger than the chunk runs whole
    assert forward_chunks([3, 3], 100) == [[3, 3]]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        forward_chunks([3, 3], 0)
    with pytest.raises(TypeError, match="batch_size"):
        forward_chunks([3, 3], 2.5)


@pytest.mark.parametrize("batch_size", [None, 3])
def test_log_probs_and_entropies_equal_trl(model_dir, tmp_path, batch_size):
    trainer = make_trainer(GRPOTrainer, model_dir, tmp_path)
    input_ids, attention_mask, logits_to_keep = trl_shaped_batch()
    for model, entropy in ((trainer.model, True), (trainer.ref_model, False)):
        expected = trl.GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
            compute_entropy=entropy)
        packed_rows = []
        hook = model.model.register_forward_hook(
            lambda module, args, kwargs, out: packed_rows.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
        try:
            grouped = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                                 batch_size=batch_size, compute_entropy=entropy)
        finally:
            hook.remove()
        # Every prompt encoded once (5 + 2 + 7 tokens; its last token once per completion: 9),
        # and 33 completion tokens, in one packed row, or in 3 (groups of 4, 2 and 3 rows,
        # chunks of 3: the group of 4 runs whole).
        assert [rows for rows, _ in packed_rows] == [1] * (1 if batch_size is None else 3)
        assert sum(tokens for _, tokens in packed_rows) == (4 + 1 + 6) + 9 + 33
        assert model.config._attn_implementation == f"{ATTENTION_NAME}+sdpa"
        assert grouped[0].dtype == expected[0].dtype == torch.float32
        assert grouped[0].shape == expected[0].shape == (9, logits_to_keep)
        torch.testing.assert_close(grouped[0], expected[0], rtol=TOL, atol=TOL)
        assert (grouped[1] is None) == (expected[1] is None) == (not entropy) and grouped[2] is expected[2] is None
        if entropy:
            torch.testing.assert_close(grouped[1], expected[1], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_one_training_step_gives_trl_loss_and_gradients(model_dir, tmp_path, use_reentrant):
    """Under gradient checkpointing (GRPOConfig's default, switched on by Trainer.train()),
    reentrant or not: the recomputed layers must take the grouped attention again."""
    stock = make_trainer(trl.GRPOTrainer, model_dir, tmp_path / "stock")
    grouped = make_trainer(GRPOTrainer, model_dir, tmp_path / "grouped")
    for trainer in (stock, grouped):
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    input_ids, attention_mask, logits_to_keep = trl_shaped_batch(seed=1)
    with torch.no_grad():
        ref_log_probs, _, _ = stock._get_per_token_logps_and_entropies(
            stock.ref_model, input_ids, attention_mask, logits_to_keep)
    inputs = {
        "prompt_ids": input_ids[:, :-logits_to_keep], "prompt_mask": attention_mask[:, :-logits_to_keep],
        "completion_ids": input_ids[:, -logits_to_keep:], "completion_mask": attention_mask[:, -logits_to_keep:],
        "advantages": torch.linspace(-1.0, 1.5, input_ids.shape[0]),
        # Old-policy log-probs away from the policy's: ratios off 1, some of them clipped.
        "old_per_token_logps": ref_log_probs + 0.3 * torch.randn(ref_log_probs.shape, generator=torch.Generator().manual_seed(2)),
        "ref_per_token_logps": ref_log_probs - 0.05,
        "num_items_in_batch": attention_mask[:, -logits_to_keep:].sum(),
    }
    results = []
    for trainer in (stock, grouped):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, read by TRL's loss
        loss = trainer.compute_loss(trainer.model, dict(inputs))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in trainer.model.named_parameters()}))
    (expected_loss, expected_grads), (loss, grads) = results
    torch.testing.assert_close(loss, expected_loss, rtol=TOL, atol=TOL)
    assert expected_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=TOL, atol=TOL, msg=name)


def test_lora_log_probs_entropies_and_gradients_equal_trl(model_dir, tmp_path):
    """A PEFT model: the adapters' forward hooks run in the grouped forward, and TRL's
    reference (the adapter disabled) comes out grouped too."""
    peft = pytest.importorskip("peft")
    # init_lora_weights=False: random adapters, so that policy and reference differ.
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = make_trainer(GRPOTrainer, model_dir, tmp_path, peft_config=lora)
    model = trainer.model
    assert isinstance(model, peft.PeftModel) and trainer.ref_model is None
    input_ids, attention_mask, logits_to_keep = trl_shaped_batch(seed=3)
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]

    def log_probs_entropies_and_grads(method):
        log_probs, entropies, _ = method(trainer, model, input_ids, attention_mask, logits_to_keep,
                                         batch_size=4, compute_entropy=True)
        return log_probs, entropies, torch.autograd.grad((log_probs + entropies).sum(), lora_params)

    expected = log_probs_entropies_and_grads(trl.GRPOTrainer._get_per_token_logps_and_entropies)
    grouped = log_probs_entropies_and_grads(GRPOTrainer._get_per_token_logps_and_entropies)
    for value, expected_value in zip([*grouped[:2], *grouped[2]], [*expected[:2], *expected[2]]):
        torch.testing.assert_close(value, expected_value, rtol=TOL, atol=TOL)
    with torch.no_grad(), model.disable_adapter():
        expected_ref = trl.GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, model, input_ids, attention_mask, logits_to_keep)[0]
        grouped_ref = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep)[0]
    torch.testing.assert_close(grouped_ref, expected_ref, rtol=TOL, atol=TOL)
    assert (grouped_ref - grouped[0]).abs().max() > 1e-3  # the adapter was really off


def test_train_runs_two_steps(model_dir, tmp_path):
    trainer = make_trainer(GRPOTrainer, model_dir, tmp_path, max_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "prefix_grouper" in str(w.message)]  # grouped throughout, no fallback
    assert trainer.state.global_step == 2
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.model.config._attn_implementation == f"{ATTENTION_NAME}+sdpa"


@pytest.mark.parametrize("unhandled", ["token_type_ids", "prompts of one token"])
def test_unhandled_inputs_fall_back_to_trl_with_one_warning(model_dir, tmp_path, unhandled):
    trainer = make_trainer(GRPOTrainer, model_dir, tmp_path)
    if unhandled == "token_type_ids":
        input_ids, attention_mask, logits_to_keep = trl_shaped_batch()
        extra = {"token_type_ids": torch.zeros_like(input_ids)}
    else:  # the shared prefix is the prompt but its last token: a one-token prompt has none
        input_ids, attention_mask, logits_to_keep = trl_shaped_batch(prompt_lens=(5, 1, 7))
        extra = {}
    expected = trl.GRPOTrainer._get_per_token_logps_and_entropies(
        trainer, trainer.model, input_ids, attention_mask, logits_to_keep, **extra)
    with pytest.warns(UserWarning, match=unhandled):
        first = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask,
                                                           logits_to_keep, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask,
                                                            logits_to_keep, **extra)
    torch.testing.assert_close(first[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(second[0], expected[0], rtol=0, atol=0)


def test_a_sliding_window_model_gives_trls_log_probs(tmp_path):
    """Mistral with a window shorter than the rows: the grouped forward honors it (TRL's
    padded rows get it from transformers' own sliding-window mask)."""
    model_dir = save_tiny_model(tmp_path / "tiny_mistral", "mistral", sliding_window=3)
    trainer = make_trainer(GRPOTrainer, model_dir, tmp_path)
    input_ids, attention_mask, logits_to_keep = trl_shaped_batch()
    expected = trl.GRPOTrainer._get_per_token_logps_and_entropies(
        trainer, trainer.model, input_ids, attention_mask, logits_to_keep, compute_entropy=True)
    grouped = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, logits_to_keep,
                                                         compute_entropy=True)
    for value, expected_value in zip(grouped[:2], expected[:2]):
        torch.testing.assert_close(value, expected_value, rtol=TOL, atol=TOL)
    unwindowed = save_tiny_model(tmp_path / "tiny_mistral_full", "mistral", sliding_window=None)
    full = make_trainer(trl.GRPOTrainer, unwindowed, tmp_path / "full")
    without_window = trl.GRPOTrainer._get_per_token_logps_and_entropies(
        full, full.model, input_ids, attention_mask, logits_to_keep)[0]
    assert (without_window - expected[0]).abs().max() > 100 * TOL  # the window matters here


@pytest.mark.parametrize("disable_dropout", [False, True])
def test_dropout_is_turned_off_and_training_runs(tmp_path, disable_dropout):
    """A policy with attention dropout (which the grouped forward refuses in training mode)
    trains: the drop-in turns dropout off, with a warning unless GRPOConfig asked for it."""
    model_dir = save_tiny_model(tmp_path / "tiny_qwen2_dropout", attention_dropout=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(GRPOTrainer, model_dir, tmp_path, max_steps=2, disable_dropout=disable_dropout)
    turned_off = [w for w in caught if "turned off dropout" in str(w.message)]
    assert len(turned_off) == (0 if disable_dropout else 1)
    if turned_off:
        assert "attention_dropout" in str(turned_off[0].message)
    for model in (trainer.model, trainer.ref_model):
        assert model.config.attention_dropout == 0.0
        assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert trainer.state.global_step == 2 and len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
