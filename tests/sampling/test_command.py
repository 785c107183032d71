"""`posttrain-jax sample` on a Hugging Face directory written by the test."""

import pytest
from flax import nnx

from posttrain_jax import cli
from posttrain_jax.data import synthetic
from posttrain_jax.models import create_model, export_hf, preset
from posttrain_jax.sampling import Sampler, SamplingParams
from posttrain_jax.tokenizer import load_tokenizer, render_chat
from posttrain_jax.trainers.rollout import completion_text, stop_tokens_for


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
