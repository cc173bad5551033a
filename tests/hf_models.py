"""
Tiny random Hugging Face models, written to a local directory with `transformers`
(no hub access needed). The tests import them; the README uses the CLI:

    python -m tests.hf_models --out=out/hf/tiny_llama                  # LlamaForCausalLM
    python -m tests.hf_models --out=out/hf/tiny_mixtral --arch=mixtral

Weights are random normal (std 0.02; RMSNorm weights 1 + 0.1 * normal, so that a
dropped or swapped norm weight changes the logits). The tokenizer files are a
small word-level tokenizer built with `tokenizers` (tests), or for the README's
model a byte-level BPE (as GPT-2's and Llama 3's) trained on Python standard-library
source, so that data prepared with it (prepare.py --tokenizer) is real text.
"""
import argparse
import json
import os
import sys
import sysconfig

import torch

# the shape the tests use: GQA (4 query heads, 2 kv heads), Llama 3 RoPE (theta 500000 and
# llama3 scaling whose three frequency bands all occur at head_dim 16)
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32})
# the README's model: train.py's default shape (block 256) with a 512-token byte-level BPE, plus GQA and llama3 RoPE
README = dict(TINY, vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
              max_position_embeddings=256, rope_scaling=dict(TINY["rope_scaling"], original_max_position_embeddings=64))
# SmolLM-135M's shape (HuggingFaceTB/SmolLM-135M config.json): 30 layers, d 576, 9 heads / 3 kv heads,
# FFN 1536, vocab 49,152, tied embeddings, 2,048 positions, theta 10,000: 134.5M parameters
SMOLLM_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5,
                   rope_theta=10000.0, rope_scaling=None)
# SmolLM-360M's (HuggingFaceTB/SmolLM-360M): 32 layers, d 960, 15 heads / 5 kv heads, FFN 2560: 361.8M parameters
SMOLLM_360M = dict(SMOLLM_135M, hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                   num_key_value_heads=5)
# Llama-3.2-1B's (meta-llama/Llama-3.2-1B): 16 layers, d 2048, 32 heads / 8 kv heads, FFN 8192, vocab 128,256,
# tied embeddings, 131,072 positions, theta 500,000 with llama3 scaling: 1.24B parameters
LLAMA32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                  rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
SHAPES = {"readme": README, "tiny": TINY, "smollm-135m": SMOLLM_135M, "smollm-360m": SMOLLM_360M,
          "llama-3.2-1b": LLAMA32_1B}


def hf_config(arch="llama", tied=False, **overrides):
    """A transformers config of the tiny shape. rope_theta/rope_scaling are passed as
    transformers 5 takes them (rope_parameters)."""
    from transformers import LlamaConfig, MistralConfig, MixtralConfig
    kw = dict(TINY, tie_word_embeddings=tied)
    kw.update(overrides)
    rope = dict(kw.pop("rope_scaling") or {"rope_type": "default"}, rope_theta=kw.pop("rope_theta"))
    if arch == "llama":
        return LlamaConfig(rope_parameters=rope, **kw)
    if arch == "mistral":
        return MistralConfig(rope_parameters=rope, sliding_window=None, **kw)
    if arch == "mixtral":
        kw.setdefault("num_local_experts", 4)
        kw.setdefault("num_experts_per_tok", 2)
        return MixtralConfig(rope_parameters=rope, **kw)
    raise ValueError(f"unknown arch {arch!r}")


def random_model(config, seed=0):
    """AutoModelForCausalLM of `config` in fp32, eval mode, with seeded random weights."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.02 * noise)
    return model.eval()


def write_tokenizer(out, vocab_size):
    """A word-level tokenizer.json + tokenizer_config.json of vocab_size entries: <unk> 0,
    <s> 1 (begin of text), </s> 2 (end of text, as LlamaConfig's bos/eos ids), then words
    w3, w4, ... ("w5 w7" encodes to [5, 7]; any other word is <unk>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
                   "eos_token": "</s>"}, f)


def write_bpe_tokenizer(out, vocab_size, n_files=100):
    """A byte-level BPE tokenizer.json + tokenizer_config.json of vocab_size entries
    (<|begin_of_text|> 0, <|end_of_text|> 1, the 256 bytes, merges), trained with
    `tokenizers` on the first n_files standard-library modules in sorted order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in os.listdir(stdlib) if f.endswith(".py"))[:n_files]
    texts = [open(os.path.join(stdlib, f), encoding="utf-8", errors="replace").read() for f in files]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|end_of_text|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special[0], "eos_token": special[1]}, f)


def save(model, out, shard_size=None, tokenizer=True):
    """save_pretrained as safetensors (sharded with an index when shard_size, e.g. "40KB")."""
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out, **kw)
    if tokenizer:
        write_tokenizer(out, model.config.vocab_size)
    return out


def save_fused(model, out):
    """Write transformers 5's own parameter names (fused experts.gate_up_proj (E, 2I, d),
    experts.down_proj) instead of the hub's per-expert keys save_pretrained writes."""
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory to write (config.json, model.safetensors, tokenizer)")
    p.add_argument("--arch", default="llama", choices=["llama", "mistral", "mixtral"])
    p.add_argument("--shape", default="readme", choices=list(SHAPES),
                   help="readme: vocab 512 (a byte-level BPE), d 128, 4 layers, block 256; "
                        "tiny: what the tests use (vocab 128, word-level tokenizer, d 64, 2 layers); "
                        "smollm-135m, smollm-360m, llama-3.2-1b: those models' shapes (word-level tokenizer; "
                        "use --tied as the real ones)")
    p.add_argument("--tied", action="store_true", help="tie the embeddings and the lm_head")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (drawn in fp32, then cast)")
    p.add_argument("--tokenizer", choices=["bpe", "word"], default=None,
                   help="bpe: a byte-level BPE trained on standard-library source (real text tokenizes; "
                        "the readme shape's default), word: a word-level tokenizer (the other shapes' default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    bpe = (args.tokenizer or ("bpe" if args.shape == "readme" else "word")) == "bpe"
    if os.path.exists(os.path.join(args.out, "config.json")):
        p.exit(2, f"error: {args.out} already holds a model; choose another --out\n")
    model = random_model(hf_config(args.arch, args.tied, **SHAPES[args.shape]), args.seed)
    model = model.to(getattr(torch, args.dtype))
    save(model, args.out, tokenizer=not bpe)
    if bpe:
        write_bpe_tokenizer(args.out, model.config.vocab_size)
    print(f"wrote a random {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"params) to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
