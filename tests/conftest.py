# Tiny random Hugging Face checkpoints, built with `transformers` itself, for every test to load.
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Self-play fine-tuning turns a model into its own "
          "opponent.", "Numbers like 12345 and 3.14159 appear too.", "naïve café Ünïcödé 日本語 🙂",
          "def f(x):\n    return x * 2\n", "Hello! How are you today? I am fine, thanks."] * 4

KINDS = {  # issue 2's four configurations and Qwen3; widths tiny, vocabulary not a power of two
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "llama3_tied": dict(model_type="llama", num_key_value_heads=1, tie_word_embeddings=True,
                        max_position_embeddings=256, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=8),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2),
    # q/k norms, and a head_dim (24) that width / heads (16) would not give: it must be read, not derived
    "qwen3": dict(model_type="qwen3", num_key_value_heads=2, head_dim=24, tie_word_embeddings=True),
}


def build_tokenizer(path, chat_template=CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(path)
    return hf


def build_checkpoint(path, kind="llama", seed=0, dtype=torch.float32, **overrides):
    # Saves an HF model with random (not default-initialised) weights plus a tokenizer; returns the model.
    import transformers
    spec = {**KINDS[kind], **overrides}
    mt = spec.pop("model_type")
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[mt]
    spec.setdefault("head_dim", 16)
    cfg = cls(vocab_size=307, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, rms_norm_eps=1e-5, bos_token_id=303, eos_token_id=302, **spec)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():  # biases and norms non-trivial too, so bugs show
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(path)
    build_tokenizer(path)
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    # One checkpoint per kind, built once per test session (building costs ~1 s each).
    root = tmp_path_factory.mktemp("ckpt")
    return {k: (str(root / k), build_checkpoint(root / k, k)) for k in KINDS}


@pytest.fixture
def process_group():
    # A group of one (gloo), as `python spin.py` runs, for tests that call spin's phases in-process; left
    # as it was found (an earlier test may hold one).
    import torch.distributed as dist

    import spin
    created = not dist.is_initialized()
    if created:
        spin.setup_distributed()
    yield
    if created:
        dist.destroy_process_group()
