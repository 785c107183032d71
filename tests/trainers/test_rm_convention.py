"""Reward models read where transformers reads: the last non-pad token of the rendered conversation.

A *ForSequenceClassification checkpoint of each family (random weights, saved by transformers) with a
tokenizer and its own chat template: `trainers.rm.score`, the GRPO reward-model reward and the RM
training batch (`reward_inputs=True`) give transformers' scores on the same text, batched and padded."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from posttrain_jax.data.preference import make_preference_eval_pipeline
from posttrain_jax.losses.dpo import batch_sequence_ids
from posttrain_jax.losses.rm import sequence_rewards
from posttrain_jax.models import export_hf, load_hf
from posttrain_jax.rewards.model import reward_model_reward
from posttrain_jax.tokenizer import load_tokenizer, render_chat
from posttrain_jax.trainers.rm import score
from tests.models.hf_fixtures import FAMILIES, make_hf_model
from tests.test_chat_templates import GEMMA3, LLAMA31, QWEN25, QWEN3

TOL = 1e-4
TEMPLATE_OF = {"llama": LLAMA31, "qwen2": QWEN25, "qwen3": QWEN3, "gemma3": GEMMA3}
ROWS = [
    {"prompt": "hi", "response": "Hello there."},  # the input
    {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "where is the cat ?"}],
     "response": "The cat sat on the mat, and the dog is lazy."},
    {"prompt": "how are you", "response": "I am fine thanks"},
]


@pytest.fixture(scope="module", params=FAMILIES)
def reward_dir(request, tmp_path_factory):
    from tests.test_chat_templates import _model_dir

    family = request.param
    root = tmp_path_factory.mktemp(f"rm-{family}")
    tok_root = tmp_path_factory.mktemp(f"tok-{family}")
    tokenizer_json = _tokenizer_json(tok_root)
    _model_dir(root, tokenizer_json, TEMPLATE_OF[family])
    config = json.loads((root / "tokenizer_config.json").read_text())
    (root / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|finetune_right_pad_id|>"}))
    vocab = load_tokenizer(root).vocab_size
    pad = load_tokenizer(root).pad_id
    hf_model = make_hf_model(family, root, head="scalar", vocab_size=vocab)
    hf_model.config.pad_token_id = pad
    hf_model.save_pretrained(str(root))
    return family, root, hf_model


def _tokenizer_json(directory):
    from tokenizers import Tokenizer as RawHFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from tests.test_tokenizer import CHAT_TOKENS, HF_SPECIALS, _corpus

    tok = RawHFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=HF_SPECIALS + CHAT_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def _messages(row):
    prompt = row["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return messages + [{"role": "assistant", "content": row["response"]}]


def _transformers_scores(root, hf_model, rows) -> np.ndarray:
    """transformers on its own: apply_chat_template, right-padded batch, the model's own pooling."""
    tok = AutoTokenizer.from_pretrained(str(root))
    ids = [tok.apply_chat_template(_messages(r), tokenize=True, return_dict=False) for r in rows]
    width = max(len(x) for x in ids)
    pad = hf_model.config.pad_token_id
    batch = torch.tensor([list(x) + [pad] * (width - len(x)) for x in ids])
    with torch.no_grad():
        return hf_model(batch, attention_mask=(batch != pad).long()).logits[:, 0].float().numpy()


def _check(name, ours, ref):
    err = float(np.abs(np.asarray(ours, np.float32) - ref).max())
    print(f"{name}: max abs err {err:.2e}")
    assert err < TOL, f"{name}: max abs error {err} >= {TOL}"


def test_score_reads_the_last_non_pad_token_like_transformers(reward_dir):
    family, root, hf_model = reward_dir
    tokenizer, model = load_tokenizer(root), load_hf(str(root))
    ref = _transformers_scores(root, hf_model, ROWS)
    _check(f"{family} score()", score(model, tokenizer, ROWS, batch_size=2), ref)
    reward = reward_model_reward(model, tokenizer, batch_size=2)
    _check(f"{family} reward-model reward", reward([r["response"] for r in ROWS], prompts=[r["prompt"] for r in ROWS]),
           ref)
    if family == "llama":  # the token read is <|eot_id|>, not the last content token "."
        ids = render_chat(tokenizer, _messages(ROWS[0])).ids
        assert tokenizer.id_to_token(ids[-1]) == "<|eot_id|>"


def test_training_batch_reads_the_same_token(reward_dir, tmp_path):
    """The RM training pipeline (reward_inputs) puts each conversation's last token at its segment's last
    input position, so the trained reward is transformers' reward of the same text."""
    family, root, hf_model = reward_dir
    tokenizer, model = load_tokenizer(root), load_hf(str(root))
    rows = [{"prompt": ROWS[i]["prompt"], "chosen": ROWS[i]["response"], "rejected": ROWS[(i + 1) % 3]["response"]}
            for i in range(3)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for packing in (False, True):
        iterator, _ = make_preference_eval_pipeline(str(path), tokenizer, template="auto", seq_len=256,
                                                    global_pairs=4, packing=packing, reward_inputs=True,
                                                    process_index=0, process_count=1)
        batch = next(iter(iterator))
        scores = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]),
                       jnp.asarray(batch["segment_ids"]))
        ids, num_pairs = batch_sequence_ids(jnp.asarray(batch["segment_ids"]), iterator.pairs_per_row)
        chosen, rejected, pair_mask = sequence_rewards(scores, ids, num_pairs)
        real = np.asarray(pair_mask) > 0
        chosen_ref = _transformers_scores(root, hf_model, [{"prompt": r["prompt"], "response": r["chosen"]}
                                                           for r in rows])
        rejected_ref = _transformers_scores(root, hf_model, [{"prompt": r["prompt"], "response": r["rejected"]}
                                                             for r in rows])
        # Packing reorders pairs within a batch: match each pair to its nearest reference pair.
        got = np.stack([np.asarray(chosen)[real], np.asarray(rejected)[real]], axis=1)
        want = np.stack([chosen_ref, rejected_ref], axis=1)
        assert len(got) == len(want) == 3
        nearest = [want[np.abs(want - g).max(axis=1).argmin()] for g in got]
        assert len({tuple(n) for n in nearest}) == 3
        _check(f"{family} training read (packing={packing})", got, np.array(nearest))


def test_exported_reward_model_scores_the_same_in_transformers(reward_dir, tmp_path):
    """Import a Hub-style reward model, export it back: transformers scores the export as it scored the original."""
    family, root, hf_model = reward_dir
    model = load_hf(str(root))
    export_hf(model, str(tmp_path / "out"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / name, tmp_path / "out" / name)
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
    assert reloaded.config.pad_token_id == hf_model.config.pad_token_id
    _check(f"{family} export", _transformers_scores(tmp_path / "out", reloaded, ROWS),
           _transformers_scores(root, hf_model, ROWS))
