"""Our top-level package names (kernels, router, engine ...) must not confuse libraries that
probe for optional packages by name. transformers probes for the hub `kernels` package; with
ours installed it must still decide "not available" and load and run models normally."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys, torch
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and spec.origin.startswith(sys.argv[2]), spec  # the name resolves to ours
    from transformers.utils import import_utils
    assert not import_utils.is_kernels_available(), "transformers mistook our kernels package for the hub one"
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7), out.shape
    assert "kernels.triton_attention" not in sys.modules, "our Triton kernels were imported by the probe"
    print("ok")
    """
)


def test_transformers_loads_and_generates_with_our_packages_installed(tiny_model, tmp_path):
    import kernels

    repo_root = kernels.__file__.rsplit("/kernels/", 1)[0]
    # Run from an unrelated directory: our packages are found as installed, not via the cwd.
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, tiny_model, repo_root], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
