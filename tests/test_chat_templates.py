"""A model's own Jinja chat template: ids equal transformers' apply_chat_template, masks from
{% generation %} (equal to return_assistant_tokens_mask) or from rendering prefixes, the "auto"
default, and the qwen3 / llama3.1 built-ins against templates of the official style.

The templates below are written for these tests in the style of the official ones (text only:
Llama 3.1's system header, Qwen 2.5's default system prompt, Qwen 3's think blocks and
last-query bookkeeping, Gemma 3's system-into-first-user and alternation check)."""

import json
import shutil

import pytest
from tokenizers import Tokenizer as RawHFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from posttrain_jax.chat import resolve_template
from posttrain_jax.tokenizer import HFTokenizer, end_of_turn_token, load_tokenizer, render_chat
from tests.test_tokenizer import CHAT_TOKENS, HF_SPECIALS, _corpus

LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3 = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

TEMPLATES = {"llama3.1": LLAMA31, "qwen2.5": QWEN25, "qwen3": QWEN3, "gemma": GEMMA3}
EOT = {"llama3.1": "<|eot_id|>", "qwen2.5": "<|im_end|>\n", "qwen3": "<|im_end|>\n", "gemma": "<end_of_turn>\n"}

SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATION = [
    {"role": "user", "content": "  Where is the cat?\n"},
    {"role": "assistant", "content": "The cat sat on the mat."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "The dog is lazy."},
]
THINKING = [
    {"role": "user", "content": "Where is the cat?"},
    {"role": "assistant", "content": "<think>\nlook around\n</think>\n\nOn the mat."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "Lazy.", "reasoning_content": "dogs nap"},
]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    tok = RawHFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=HF_SPECIALS + CHAT_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_tokens(["<think>", "</think>"])  # Qwen 3's are added (not special) tokens
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _model_dir(root, tokenizer_json, template: str | None, *, jinja_file: bool = False, model_type: str | None = None):
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_json, root / "tokenizer.json")
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if template is not None and not jinja_file:
        config["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    if template is not None and jinja_file:
        (root / "chat_template.jinja").write_text(template)
    if model_type:
        (root / "config.json").write_text(json.dumps({"model_type": model_type}))
    return root


@pytest.fixture(scope="module", params=list(TEMPLATES))
def model_dir(request, tmp_path_factory, tokenizer_json):
    # Half the templates come as chat_template.jinja, half inside tokenizer_config.json.
    jinja_file = request.param in ("qwen3", "gemma")
    root = _model_dir(tmp_path_factory.mktemp(request.param), tokenizer_json, TEMPLATES[request.param],
                      jinja_file=jinja_file)
    return request.param, root


def _reference(root):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(root))


def _masked(tok, enc):
    return tok.decode([i for i, m in zip(enc.ids, enc.assistant_mask, strict=True) if m])


CASES = {
    "two turns": CONVERSATION,
    "with system": [SYSTEM, *CONVERSATION],
    "prompt only": CONVERSATION[:3],
    "one turn": CONVERSATION[:2],
    "thinking": THINKING,
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_own_template_ids_equal_transformers(model_dir, case, generation_prompt):
    name, root = model_dir
    messages = CASES[case]
    tok = load_tokenizer(root)
    ours = render_chat(tok, messages, add_generation_prompt=generation_prompt)  # template="auto"
    reference = _reference(root)
    assert ours.text == reference.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
    theirs = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                           return_dict=False)
    assert ours.ids == list(theirs)


# What the prefix-rendering mask must hold for CONVERSATION: each assistant turn from the end of the
# generation prompt to the end of its turn (Qwen 3's final turn carries its empty think block).
def _expected_masked(name, messages):
    out = []
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        content = m["content"]
        if name == "qwen3":
            if "</think>" in content:
                reasoning, content = content.split("</think>")[0].split("<think>")[-1].strip("\n"), \
                    content.split("</think>")[-1].lstrip("\n")
            else:
                reasoning = m.get("reasoning_content", "")
            if i == last or (i > 2 and reasoning):
                content = f"<think>\n{reasoning}\n</think>\n\n{content}"
        out.append(content + EOT[name])
    return "".join(out)


@pytest.mark.parametrize("case", ["two turns", "with system", "thinking"])
def test_prefix_rendering_mask(model_dir, case):
    name, root = model_dir
    tok = load_tokenizer(root)
    messages = CASES[case]
    enc = render_chat(tok, messages)
    assert _masked(tok, enc) == _expected_masked(name, messages)
    # Nothing of a prompt is trained on.
    assert not any(render_chat(tok, messages[:3], add_generation_prompt=True).assistant_mask[-3:])


def _with_generation(template: str) -> str:
    """The Qwen 2.5-style template with {% generation %} around each assistant turn's body and ending."""
    return template.replace(
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
        "{%- if message.role == 'assistant' %}{{- '<|im_start|>' + message.role + '\\n' }}"
        "{%- generation %}{{- message.content + '<|im_end|>\\n' }}{%- endgeneration %}"
        "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}")


@pytest.mark.parametrize("case", list(CASES))
def test_generation_blocks_equal_return_assistant_tokens_mask(tmp_path, tokenizer_json, case):
    template = _with_generation(QWEN25)
    assert "generation" in template
    root = _model_dir(tmp_path / "gen", tokenizer_json, template)
    messages = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in CASES[case]]
    ours = render_chat(load_tokenizer(root), messages)
    theirs = _reference(root).apply_chat_template(messages, tokenize=True, return_dict=True,
                                                  return_assistant_tokens_mask=True)
    assert ours.ids == list(theirs["input_ids"])
    assert ours.assistant_mask == [bool(m) for m in theirs["assistant_masks"]]


@pytest.mark.parametrize("name", ["llama3.1", "qwen3", "gemma", "qwen2.5"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_builtins_equal_official_style_templates(tmp_path, tokenizer_json, name, case, generation_prompt):
    """The built-in of each name renders what the official-style template renders, with the same mask."""
    root = _model_dir(tmp_path / name, tokenizer_json, TEMPLATES[name])
    tok = load_tokenizer(root)
    messages = CASES[case]
    own = render_chat(tok, messages, add_generation_prompt=generation_prompt)
    builtin = render_chat(tok, messages, template=name, add_generation_prompt=generation_prompt)
    assert builtin.text == own.text and builtin.ids == own.ids
    assert builtin.assistant_mask == own.assistant_mask


@pytest.mark.parametrize("name", ["qwen3", "llama3.1"])
def test_builtin_template_kwargs(tmp_path, tokenizer_json, name):
    root = _model_dir(tmp_path / name, tokenizer_json, TEMPLATES[name])
    tok = load_tokenizer(root)
    kwargs = {"enable_thinking": False} if name == "qwen3" else {"date_string": "01 Jan 2026"}
    own = render_chat(tok, CONVERSATION[:1], add_generation_prompt=True, **kwargs)
    builtin = render_chat(tok, CONVERSATION[:1], template=name, add_generation_prompt=True, **kwargs)
    assert builtin.text == own.text
    assert ("<think>\n\n</think>\n\n" if name == "qwen3" else "Today Date: 01 Jan 2026") in own.text
    reference = _reference(root).apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True,
                                                     **kwargs)
    assert own.text == reference


def test_qwen3_drops_earlier_reasoning_keeps_final():
    from posttrain_jax.chat import _render_qwen3

    text = "".join(t for t, _ in _render_qwen3(THINKING, False))
    assert "look around" not in text and "<think>\ndogs nap\n</think>\n\nLazy." in text
    assert "<|im_start|>assistant\nOn the mat.<|im_end|>" in text


def test_tools_reach_the_template(tmp_path, tokenizer_json):
    root = _model_dir(tmp_path / "tools", tokenizer_json, LLAMA31)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    ours = render_chat(load_tokenizer(root), CONVERSATION[:1], tools=tools, add_generation_prompt=True)
    theirs = _reference(root).apply_chat_template(CONVERSATION[:1], tools=tools, tokenize=False,
                                                  add_generation_prompt=True)
    assert ours.text == theirs and "Environment: ipython" in ours.text


def test_template_errors_are_actionable(tmp_path, tokenizer_json):
    root = _model_dir(tmp_path / "gemma", tokenizer_json, GEMMA3)
    tok = load_tokenizer(root)
    # The template's own raise_exception is a ValueError with its message.
    from posttrain_jax.chat_jinja import ChatTemplateError, render_jinja

    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_jinja(GEMMA3, [{"role": "assistant", "content": "x"}], add_generation_prompt=False,
                     special_tokens=tok.special_token_strings())
    bad = _model_dir(tmp_path / "bad", tokenizer_json, "{% for m in messages %}{{ m.content }")
    with pytest.raises(ValueError, match="does not parse"):
        render_chat(load_tokenizer(bad), CONVERSATION[:2])


def test_auto_prefers_jinja_file_then_config_then_model_type(tmp_path, tokenizer_json):
    both = _model_dir(tmp_path / "both", tokenizer_json, QWEN25)
    (both / "chat_template.jinja").write_text(GEMMA3)  # transformers: the .jinja file wins
    assert render_chat(load_tokenizer(both), CONVERSATION[:2]).text == \
        _reference(both).apply_chat_template(CONVERSATION[:2], tokenize=False)
    assert "<start_of_turn>" in render_chat(load_tokenizer(both), CONVERSATION[:2]).text
    inferred = _model_dir(tmp_path / "inferred", tokenizer_json, None, model_type="qwen3")
    tok = load_tokenizer(inferred)
    assert resolve_template(tok).name == "qwen3"
    text = render_chat(tok, CONVERSATION[:2]).text
    assert text.endswith("<think>\n\n</think>\n\nThe cat sat on the mat.<|im_end|>\n")
    bare = _model_dir(tmp_path / "bare", tokenizer_json, None)
    with pytest.raises(ValueError, match=r"no chat template of its own .* pass --chat-template"):
        render_chat(load_tokenizer(bare), CONVERSATION[:2])
    named = _model_dir(tmp_path / "named", tokenizer_json, None)
    config = json.loads((named / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": LLAMA31}, {"name": "default", "template": QWEN25}]
    (named / "tokenizer_config.json").write_text(json.dumps(config))
    assert render_chat(load_tokenizer(named), CONVERSATION[:2]).text.startswith("<|im_start|>system\nYou are Qwen")


def test_jinja_file_as_template(tmp_path, tokenizer_json):
    root = _model_dir(tmp_path / "plain", tokenizer_json, None)
    path = tmp_path / "gemma.jinja"
    path.write_text(GEMMA3)
    enc = render_chat(load_tokenizer(root), CONVERSATION[:2], template=str(path))
    assert enc.text.startswith("<|begin_of_text|><start_of_turn>user\n")


def test_end_of_turn_and_special_tokens_of_own_template(model_dir):
    name, root = model_dir
    tok = HFTokenizer(root)
    assert end_of_turn_token("auto", tok) == EOT[name].strip("\n")
    from posttrain_jax.tokenizer import template_special_tokens

    assert EOT[name].strip("\n") in template_special_tokens("auto", tok)


def test_strftime_now_and_template_kwargs_like_transformers(tmp_path, tokenizer_json):
    import datetime

    template = ("{{ bos_token }}Today: {{ strftime_now('%Y-%m-%d') }} {{ custom | default('none') }}\n"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token if m.role == 'assistant' }}\n"
                "{% endfor %}")
    root = _model_dir(tmp_path / "dated", tokenizer_json, template)
    ours = render_chat(load_tokenizer(root), CONVERSATION[:2], custom="yes")
    theirs = _reference(root).apply_chat_template(CONVERSATION[:2], tokenize=False, custom="yes")
    assert ours.text == theirs and datetime.date.today().isoformat() in ours.text and "yes" in ours.text
    # Prefix rendering: this template has no generation prompt, so what the model writes after the prompt is
    # its role label too; the turn runs to the end of its line (eos and newline included).
    assert _masked(load_tokenizer(root), ours) == "assistant: The cat sat on the mat.<|end_of_text|>\n"
