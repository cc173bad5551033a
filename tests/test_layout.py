"""The flat layout puts every module at the top level, where the script's folder comes
first on sys.path: a file named like an installed package hides that package from
everything imported in the same process. transformers, for one, imports the `kernels`
package (its kernel hub) when it builds a model, which is why the expert computation
lives in experts.py. These tests fail when a module of ours takes a name that an
installed distribution or the standard library already uses."""
import importlib.metadata
import os
import subprocess
import sys

from helpers import ROOT


def top_level_names():
    """The importable names this repo adds at the top level: its .py files and data/."""
    names = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    names.add("data")
    assert {"model", "router", "experts", "train"} <= names
    return names


def test_no_module_shadows_an_installed_package():
    installed = importlib.metadata.packages_distributions()   # import name -> distributions
    clashes = {n: installed[n] for n in sorted(top_level_names()) if n in installed}
    assert not clashes, f"these modules hide installed packages of the same name: {clashes}"


def test_no_module_shadows_the_standard_library():
    clashes = sorted(top_level_names() & set(sys.stdlib_module_names))
    assert not clashes, f"these modules hide standard-library modules: {clashes}"


def test_transformers_builds_a_model_after_ours_is_imported():
    """The failure a shadowing name causes: our model imported first, then a
    transformers model built in the same process (what the parity tests do)."""
    code = ("import model, experts, router\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,\n"
            "    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))\n"
            "import experts as e; assert hasattr(e, 'moe_ffn'), e.__file__\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
