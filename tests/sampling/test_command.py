"""`posttrain-jax sample` on a Hugging Face directory written by the test."""

import pytest
from flax import nnx

from posttrain_jax import cli
from posttrain_jax.data import synthetic
from posttrain_jax.models import create_model, export_hf, preset
from posttrain_jax.sampling import Sampler, SamplingParams
from posttrain_jax.tokenizer import load_tokenizer, render_chat
from posttrain_jax.sampling.text import completion_text, stop_tokens_for


def test_sample_command_prints_what_the_sampler_generates(tmp_path, capsys):
    tokenizer_path = str(synthetic.train_sentencepiece(tmp_path / "tok", synthetic.corpus(seed=0)))
    model = create_model(preset("quickstart"), seed=2)
    export_hf(model, str(tmp_path / "hf"))
    prompt = "What is 3 plus 4?"
    cli.main(["sample", "--checkpoint", str(tmp_path / "hf"), "--tokenizer", tokenizer_path, "--prompt", prompt,
              "--greedy", "--max-new-tokens", "5"])
    printed = capsys.readouterr().out

    tokenizer = load_tokenizer(tokenizer_path)
    ids = render_chat(tokenizer, [{"role": "user", "content": prompt}], template="chatml",
                      add_generation_prompt=True).ids
    graphdef, state = nnx.split(model)
    out = Sampler(graphdef, model.config)(state, [ids], SamplingParams(
        max_new_tokens=5, greedy=True, pad_token=3, stop_tokens=stop_tokens_for(tokenizer, "chatml")))
    text = completion_text(tokenizer, out.tokens[0], int(out.lengths[0]), bool(out.stopped[0]))
    assert printed.startswith(f">>> {prompt}\n{text}")


def test_sample_command_needs_a_checkpoint(tmp_path):
    with pytest.raises(Exception, match="does not exist|no checkpoint|not found"):
        cli.main(["sample", "--checkpoint", str(tmp_path / "missing"), "--prompt", "hi"])


def test_sample_defaults_to_the_models_own_template(tmp_path, capsys):
    """The issue's input: an HF Gemma 3 directory whose tokenizer has no <|im_start|>. `sample` renders the prompt
    with the directory's own template (ids equal transformers' apply_chat_template) and stops at <end_of_turn>."""
    import json

    from tokenizers import Tokenizer as RawHFTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    from tests.models.hf_fixtures import make_hf_model
    from tests.test_chat_templates import GEMMA3

    directory = tmp_path / "gemma"
    model = make_hf_model("gemma3", directory)  # vocab 256
    tok = RawHFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, show_progress=False,
                                  special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"])
    tok.train_from_iterator(["What is the capital of France ?", "The answer is Paris ."] * 20, trainer)
    assert tok.get_vocab_size() <= 256
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "chat_template": GEMMA3,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    prompt = "What is the capital of France ?"
    cli.main(["sample", "--checkpoint", str(directory), "--prompt", prompt, "--greedy", "--max-new-tokens", "4"])
    printed = capsys.readouterr().out

    reference = AutoTokenizer.from_pretrained(str(directory))
    ids = reference.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                        add_generation_prompt=True, return_dict=False)
    ours = load_tokenizer(directory)
    assert render_chat(ours, [{"role": "user", "content": prompt}], add_generation_prompt=True).ids == list(ids)
    stops = stop_tokens_for(ours, "auto")
    assert ours.token_to_id("<end_of_turn>") in stops
    from posttrain_jax.models import load_hf

    loaded = load_hf(str(directory))
    graphdef, state = nnx.split(loaded)
    out = Sampler(graphdef, loaded.config)(state, [list(ids)], SamplingParams(
        max_new_tokens=4, greedy=True, pad_token=0, stop_tokens=stops))
    text = completion_text(ours, out.tokens[0], int(out.lengths[0]), bool(out.stopped[0]))
    assert printed.startswith(f">>> {prompt}\n{text}")
    del model
