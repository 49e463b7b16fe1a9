"""``slimformer generate`` on a tiny Llama folder, a compressed folder of it, and bad input."""

import json

import pytest
from test_generation import lively

import slimformer
from slimformer.methods.quantization.rtn import RTNConfig
from slimformer.runtime import GenerationConfig, TextGenerator

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    loaded = lively("llama")
    loaded.tokenizer.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("tiny-llama")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def test_generate_prompt_and_chat_from_a_folder(llama_folder, run_cli):
    code, out, err = run_cli("generate", str(llama_folder), "--prompt", "def foo(x):", "--max-new-tokens", "8", "--no-compile", "--json")
    assert code == 0, err
    got = json.loads(out)
    loaded = slimformer.load(llama_folder)
    expected = TextGenerator(loaded, compile=False).generate("def foo(x):", GenerationConfig(max_new_tokens=8))
    assert got["texts"] == expected.texts and got["stats"]["new_tokens"] == len(expected.tokens[0])
    code, out, err = run_cli("generate", str(llama_folder), "--chat", "hello there", "--max-new-tokens", "6", "--no-compile")
    chat = TextGenerator(loaded, compile=False).generate("hello there", GenerationConfig(max_new_tokens=6), chat=True)
    assert code == 0 and out.rstrip("\n") == chat.texts[0] and "decode" in err and "tok/s" in err
    code, out, err = run_cli("generate", str(llama_folder), "--prompt", "a", "--prompt", "bb", "--max-new-tokens", "4",
                             "--no-compile", "--speculate", "prompt-lookup")
    assert code == 2 and "one prompt at a time" in err


def test_generate_from_a_compressed_folder_matches_the_in_memory_model(llama_folder, tmp_path, run_cli):
    loaded = slimformer.load(llama_folder)
    slimformer.compress(loaded, slimformer.recipe_from_steps(RTNConfig(bits=4, group_size=32)))
    out_dir = slimformer.save(loaded, tmp_path / "w4")
    config = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    expected = TextGenerator(loaded, compile=False).generate("def foo(x):", config).texts
    # keep: float activations, as in memory (auto may round them to int8 on an AVX-512 VNNI CPU)
    code, out, err = run_cli("generate", str(out_dir), "--prompt", "def foo(x):", "--max-new-tokens", "8", "--no-compile", "--json",
                             "--int8-activations", "keep")
    assert code == 0, err
    assert json.loads(out)["texts"] == expected
    code, out, err = run_cli("generate", str(out_dir), "--prompt", "def foo(x):", "--max-new-tokens", "8", "--no-compile", "--json")
    assert code == 0, err
    assert json.loads(out)["texts"][0]
    reloaded = slimformer.load(out_dir, execution={"int8_activations": "keep"})
    kernels = {m.kernel for m in reloaded.model.modules() if hasattr(m, "kernel")}
    assert "int4pack" in kernels or "unpack" in kernels  # packed weights, used as they are
    assert TextGenerator(reloaded, compile=False).generate("def foo(x):", config).texts == expected


@pytest.mark.parametrize("args, expect", [
    (["--max-new-tokens", "4"], "nothing to generate"),
    (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
    (["--prompt", "x", "--temperature", "0.5", "--speculate", "self"], "greedy"),
])
def test_bad_generate_input_is_a_one_line_error(llama_folder, run_cli, args, expect):
    code, out, err = run_cli("generate", str(llama_folder), "--no-compile", *args)
    lines = [line for line in err.splitlines() if line.startswith("slimformer: error:")]
    assert code == 2 and len(lines) == 1 and expect in lines[0]


def test_an_encoder_cannot_generate(tiny_folder, run_cli):
    code, _out, err = run_cli("generate", str(tiny_folder), "--prompt", "x", "--no-compile")
    assert code == 2 and "cannot generate" in err
