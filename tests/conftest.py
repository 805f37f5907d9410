import os

import torch

# Triton kernels run on CPU under the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from engine.model_files import resolve_model_dir  # noqa: E402

TINY_ARCHS = ("llama", "llama-untied", "qwen2", "mistral")


def make_tiny_model(path, arch: str = "llama", seed: int = 0, **overrides):
    """A random-weight model folder (config.json + model.safetensors, no tokenizer), written by
    transformers itself so that our loader reads exactly what transformers would."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        # Larger than the usual 0.02 so logits are peaked and greedy choices are not near-ties.
        initializer_range=0.2, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True)),
        "llama-untied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False, attention_bias=False)),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=False, rope_theta=1e6)),
        "mistral": (MistralConfig, MistralForCausalLM, dict(tie_word_embeddings=False, sliding_window=None)),
    }
    config_cls, model_cls, extra = classes[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**common, **extra, **overrides})).float()
    if arch == "qwen2":  # biases start at zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.2)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: str(make_tiny_model(root / arch, arch)) for arch in TINY_ARCHS}


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dirs):
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def default_model_dir():
    """The default model as a safetensors folder (converted from the GGUF once, then cached)."""
    return resolve_model_dir(None)


@pytest.fixture(scope="session")
def default_llm(default_model_dir):
    from oracle import ORACLE_DTYPE

    from engine import LLM

    return LLM(kv_cache_gb=1.0, dtype=ORACLE_DTYPE)


@pytest.fixture(scope="session")
def hf_default_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (clusters started by tests join it)."""
    import ray

    from cluster.cluster import LOCAL_POOL_RESOURCES

    ray.init(address="local", resources=LOCAL_POOL_RESOURCES, include_dashboard=False, namespace="pdserve-tests",
             object_store_memory=256 << 20, log_to_driver=False)  # fmt: skip
    yield
    ray.shutdown()


@pytest.fixture
def published_table(tmp_path):
    """render(NAME, {file name: a small run's JSON}): the published table NAME rendered from those
    files, put where `make bench-results` writes its own, so a renderer is checked against what its
    bench really writes."""
    from benchmarks import tables

    def render(name: str, files: dict) -> str:
        results = tmp_path / "published" / tables.RESULTS
        results.mkdir(parents=True, exist_ok=True)
        for file, source in files.items():
            (results / file).write_bytes(source.read_bytes())
        return tables.render(name, tmp_path / "published", tables.RESULTS.parent)

    return render
