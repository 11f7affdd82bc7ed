"""The bounded chat-template sandbox (minillm.template): ordinary templates render exactly as in
jinja2's own sandbox; hostile ones end in one ChatTemplateError, quickly and without big allocations."""

import functools
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile import HOSTILE_TEMPLATES
from hypothesis import given
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment

from minillm.errors import MinillmError
from minillm.synthetic import CHAT_TEMPLATE
from minillm.template import MAX_CHARS, MAX_SECONDS, ChatTemplate, ChatTemplateError, size

# Templates in the styles of real models' (ChatML, Llama 3, Gemma, Mistral, a tool-calling one), using
# the features real templates use: loops, loop.first/last, namespaces, slicing, filters, methods.
ORDINARY = {
    "chatml": CHAT_TEMPLATE,
    "llama3": "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
              "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    "gemma": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
             "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}"
             "{% endif %}{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' "
             "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + "
             "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<start_of_turn>model\n' }}{% endif %}",
    "mistral": "{%- set ns = namespace(system='') -%}{%- for m in messages if m.role == 'system' -%}"
               "{%- set ns.system = ns.system ~ m.content ~ '\n' -%}{%- endfor -%}{{ bos_token }}"
               "{%- for m in messages if m.role != 'system' -%}{%- if m.role == 'user' -%}"
               "{{ '[INST] ' ~ (ns.system if loop.first else '') ~ m.content.strip() ~ ' [/INST]' }}"
               "{%- else -%}{{ ' ' ~ m.content ~ eos_token }}{%- endif -%}{%- endfor -%}",
    "tools": "{% for m in messages %}{{ '%s: %s' % (m.role | upper, m.content) }}{{ '\n' if not loop.last }}"
             "{% if m.role == 'user' and m.content.startswith('/') %}{{ '(command {})'.format(m.content[1:].split()|first)"
             " }}{% endif %}{% endfor %}{{ ' | '.join(messages|map(attribute='role')|unique|list) }}"
             "{{ messages|length }} {{ (messages|selectattr('role', 'equalto', 'user')|list|count) * 2 }}"
             "{{ {'n': messages|length}|tojson }}{{ messages[-1]['content'][:20]|center(30)|replace(' ', '.') }}",
}

roles = st.sampled_from(["system", "user", "assistant"])
texts = st.text(max_size=40)
conversations = st.lists(st.fixed_dictionaries({"role": roles, "content": texts}), min_size=1, max_size=6)


@pytest.mark.parametrize("name", ORDINARY)
@given(messages=conversations, add_generation_prompt=st.booleans())
def test_ordinary_templates_render_as_in_jinja2s_sandbox(name, messages, add_generation_prompt):
    variables = dict(messages=messages, add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token="</s>")
    ours, reference = compiled(name)
    assert ours.render(**variables) == reference.render(**variables)


@functools.cache
def compiled(name):
    """The template in minillm's sandbox and in jinja2's, set up as HF transformers sets it up."""
    reference = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=["jinja2.ext.loopcontrols"]).from_string(ORDINARY[name])
    return ChatTemplate(ORDINARY[name]), reference


@pytest.mark.parametrize("name", HOSTILE_TEMPLATES)
def test_hostile_template_is_one_line_error_within_a_second(name):
    start = time.perf_counter()
    with pytest.raises(MinillmError) as err:
        ChatTemplate(HOSTILE_TEMPLATES[name]).render(messages=[{"role": "user", "content": "hi"}])
    assert time.perf_counter() - start < MAX_SECONDS + 1
    assert "\n" not in str(err.value)


CHILD = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from hostile import HOSTILE_TEMPLATES
from minillm.errors import MinillmError
from minillm.template import ChatTemplate
ChatTemplate("{{ 1 }}").render()
with open("/proc/self/statm") as f:
    cap = int(f.read().split()[0]) * resource.getpagesize() + (512 << 20)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
for source in HOSTILE_TEMPLATES.values():
    try:
        ChatTemplate(source).render(messages=[{"role": "user", "content": "hi"}])
    except MinillmError:
        pass
print("done")
"""


def test_hostile_templates_never_allocate_past_the_bound():
    """All of them in one child process whose address space may grow by 512 MiB at most: an
    operation that allocated first and checked after would die there with a MemoryError."""
    result = subprocess.run([sys.executable, "-c", CHILD, str(Path(__file__).parent)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr[-2000:]


def test_output_up_to_the_bound_renders_and_one_more_character_does_not():
    assert len(ChatTemplate(f"{{{{ 'x' * {MAX_CHARS} }}}}").render()) == MAX_CHARS
    with pytest.raises(ChatTemplateError, match="output"):
        ChatTemplate(f"{{{{ 'x' * {MAX_CHARS} }}}}!").render()


def test_raise_exception_is_the_templates_message():
    with pytest.raises(ChatTemplateError, match="chat template: roles must alternate"):
        ChatTemplate("{{ raise_exception('roles must alternate') }}").render()


def test_a_call_outside_the_read_only_methods_is_refused():
    with pytest.raises(ChatTemplateError, match="str.translate"):
        ChatTemplate("{{ 'abc'.translate({}) }}").render()


@given(st.recursive(st.one_of(st.text(max_size=5), st.integers(-10**30, 10**30), st.floats(), st.booleans(),
                              st.none()),
                    lambda children: st.one_of(st.lists(children, max_size=4),
                                               st.dictionaries(st.text(max_size=3), children, max_size=3)),
                    max_leaves=20))
def test_size_is_within_a_small_factor_of_the_printed_length(value):
    """size() is what the bounds count; str() is what is made. They differ by a small factor: a
    float counts 24 whatever it prints as, and a character inside a container's string prints as
    an escape of up to 10 ('\\U000e0000')."""
    printed = len(str(value))
    assert size(value) <= 6 * printed + 24 and printed <= 10 * size(value)


def test_size_stops_counting_a_shared_structure_at_the_limit():
    shared = ["x" * 1000]
    for _ in range(60):  # 2^60 leaves, 60 lists
        shared = [shared, shared]
    start = time.perf_counter()
    assert size(shared, limit=10**6) > 10**6
    assert time.perf_counter() - start < 1


def test_time_bound_applies_to_each_render():
    template = ChatTemplate("{% for i in range(30000) %}{{ i % 7 }}{% endfor %}")
    for _ in range(3):
        assert len(template.render()) == 30000
