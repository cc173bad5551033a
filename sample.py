"""
Generate text from a trained model (nanoGPT's sample.py, for every checkpoint
this project writes: dense, routed MoE, upcycled, Lory).

    python sample.py --ckpt=out/demo/upcycled
    python sample.py --ckpt=out/demo/upcycled --start="def " --num_samples=3 --max_new_tokens=200
    python sample.py --ckpt=out/demo/dense --start=FILE:prompt.txt --temperature=0.7 --top_k=20 --seed=1
    python sample.py --ckpt=out/hf/moe --start="w5 w7" --top_k=1 --no_cache   # greedy, recomputing

The tokenizer is the checkpoint's own Hugging Face tokenizer.json when it has one (an
imported model and every run that started from it: data.tokenizer.find_tokenizer_dir),
else the one the run's data was prepared with (its meta.json). With an HF tokenizer the
prompt is encoded as transformers encodes it (the tokenizer's post-processor may add a
begin-of-text token) and an empty --start begins at the begin-of-text token (else the
end-of-text token); with the others an empty --start begins at the end-of-text token,
i.e. at the start of a document. Generation uses the KV cache (--no_cache recomputes the
whole context for every token: the same tokens, slower). Routed MoE layers route each
token in eval mode, dropless; Lory layers merge their experts once, from the prompt
(model.GPT.generate).
"""
import json
import sys

import torch

from checkpoint import CheckpointError
from configurator import ArgumentParser, device_problem, float_problem, run_cli
from data.dataset import load_meta
from data.tokenizer import HFTokenizer, find_tokenizer_dir, load_tokenizer
from eval import EvalError, _prepare_hint, eval_data_dir, load_run
from init_from import padded_hf_vocab

SEPARATOR = "---------------"


def load_tokenizer_for(ckpt, data_dir=None, ckpt_dir=None):
    """(tokenizer, start id) of a checkpoint: its own HF tokenizer when ckpt_dir leads to
    one (and no data_dir is given), else the tokenizer of the data it was trained on. The
    start id is the begin-of-text token of an HF tokenizer, else the end-of-text token,
    or 0 for data without a document separator (char data)."""
    model_vocab = ckpt["model_args"]["vocab_size"]
    tok_dir = find_tokenizer_dir(ckpt, ckpt_dir) if ckpt_dir and not data_dir else None
    if tok_dir:
        tok = HFTokenizer(tok_dir)
        check_vocab(tok.vocab_size, model_vocab, True, tok_dir)
        start = tok.bos_token if tok.bos_token is not None else tok.eot_token
        return tok, (0 if start is None else start)
    if (ckpt.get("config") or {}).get("init_from") == "hf" and not data_dir:
        raise EvalError(f"{ckpt_dir} has no tokenizer: it was imported from a directory without tokenizer.json; "
                        f"copy the model's tokenizer.json next to its ckpt.pt, or pass --data_dir of its data")
    d = eval_data_dir(ckpt, data_dir)
    try:
        meta = load_meta(d)
    except FileNotFoundError as e:
        msg = str(e).splitlines()[0]
        raise EvalError(f"no tokenizer for this checkpoint (no tokenizer.json next to it, and {msg}"
                        + ("" if "prepare" in msg else f"; {_prepare_hint(d)}") + ")") from None
    check_vocab(meta["vocab_size"], model_vocab, meta.get("tokenizer") == "hf", d)
    start = meta.get("eot_token")
    return load_tokenizer(meta, d), (0 if start is None else start)


def check_vocab(vocab, model_vocab, hf, where):
    """EvalError unless a tokenizer of `vocab` tokens (from `where`) can feed a model of
    model_vocab: the two must be equal, except that an HF tokenizer may be smaller
    (an imported model may pad its embedding table beyond the tokenizer)."""
    if vocab != model_vocab and not padded_hf_vocab("hf" if hf else None, vocab, model_vocab):
        raise EvalError(f"the tokenizer of {where} has {vocab} tokens but the model {model_vocab}: pass --data_dir "
                        f"of the data this checkpoint was trained on (or a tokenizer of {model_vocab} tokens)")


def encode_prompt(tok, prompt):
    """Prompt ids: an HF tokenizer encodes as transformers does by default (its
    post-processor may prepend begin-of-text); the others encode the plain text."""
    if isinstance(tok, HFTokenizer):
        return tok.tok.encode(prompt).ids
    return tok.encode(prompt)


def read_start(start):
    """The prompt text: --start as it is, or the contents of the file in --start=FILE:path."""
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"--start=FILE:{path} cannot be read ({getattr(e, 'strerror', None) or e}): "
                        f"pass an existing UTF-8 text file") from None


def sample(ckpt_dir, prompt="", max_new_tokens=200, temperature=0.8, top_k=None, seed=0, data_dir=None,
           device="cpu", num_samples=1, use_cache=True):
    """num_samples continuations of `prompt`, each decoded with its prompt (an empty
    prompt, and a begin-of-text token the tokenizer added, are not shown). One generator
    seeded once draws them all in turn, so the first sample does not depend on
    num_samples. Returns a list of strings."""
    model, ckpt = load_run(ckpt_dir, device)
    tok, start_id = load_tokenizer_for(ckpt, data_dir, ckpt_dir)
    if top_k is not None and top_k > model.config.vocab_size:
        raise EvalError(f"--top_k={top_k} is more than the model's vocab_size={model.config.vocab_size}: use at most "
                        f"{model.config.vocab_size}, or leave --top_k out to sample from every token")
    ids = encode_prompt(tok, prompt) if prompt else []
    prompt_given = bool(ids)
    ids = ids or [start_id]
    hidden = 1 if not prompt_given or ids[0] == getattr(tok, "bos_token", None) else 0   # tokens not shown
    if max(ids) >= model.config.vocab_size:
        raise EvalError(f"the prompt encodes to token ids >= the model's vocab_size={model.config.vocab_size}")
    idx = torch.tensor([ids], dtype=torch.long, device=device)        # (1, T)
    gen = torch.Generator(device=device).manual_seed(seed)
    texts = []
    with torch.no_grad():
        for _ in range(num_samples):
            out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen,
                                 use_cache=use_cache)
            texts.append(tok.decode(out[0].tolist()[hidden:]))
    return texts


def build_parser():
    p = ArgumentParser(prog="sample.py", description="Generate text from a checkpoint (see the module docstring).")
    p.add_argument("--ckpt", required=True, help="run directory (out_dir) or ckpt.pt")
    p.add_argument("--start", default="", help='prompt text, or FILE:path to read it from a file (default: "")')
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="> 0; lower is more deterministic")
    p.add_argument("--top_k", type=int, default=None, help="keep only the k most likely tokens (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps (default cpu)")
    p.add_argument("--data_dir", default=None, help="default: the checkpoint config's data_dir or data/<dataset>")
    p.add_argument("--no_cache", action="store_true",
                   help="recompute the whole context for every new token instead of using the KV cache")
    p.add_argument("--json", action="store_true", help='stdout: one JSON object {"samples": [...]}')
    return p


# Every integer flag and the closed interval it must lie in. top_k is also at most the
# model's vocab_size (checked in sample()); seed spans what torch.Generator.manual_seed takes.
INT_RANGES = {"num_samples": (1, 1000), "max_new_tokens": (0, 100_000), "top_k": (1, 2 ** 31 - 1),
              "seed": (0, 2 ** 64 - 1)}
MAX_TOKENS = 1_000_000   # num_samples * max_new_tokens: one forward pass per token, so more runs for hours
# softmax(logits / temperature) in float32 stays finite while |logit| / temperature < 3.4e38; at
# 1e-3 that holds for |logit| < 3.4e35 (below it sampling is greedy anyway: use --top_k=1)
MIN_TEMPERATURE = 1e-3


def number_problem(args):
    """The first flag of sample.py's numbers out of its range, as one line, or None."""
    for name, (low, high) in INT_RANGES.items():
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            return f"--{name}={value} must be an integer in [{low}, {high}]"
    if float_problem("--temperature", args.temperature):
        return float_problem("--temperature", args.temperature)
    if args.temperature < MIN_TEMPERATURE:
        return (f"--temperature={args.temperature} is below {MIN_TEMPERATURE}: logits / temperature would "
                f"overflow to inf and softmax to NaN; use --top_k=1 for greedy decoding")
    if args.num_samples * args.max_new_tokens > MAX_TOKENS:
        return (f"--num_samples={args.num_samples} x --max_new_tokens={args.max_new_tokens} is more than "
                f"{MAX_TOKENS:,} tokens: generation runs one forward pass per token, so this would run for hours; "
                f"ask for fewer")
    return None


def main(argv=None):
    args = build_parser().parse_args(argv)
    if number_problem(args):
        raise EvalError(number_problem(args))
    if device_problem(args.device):
        raise EvalError(f"--device={args.device} {device_problem(args.device)}")
    texts = sample(args.ckpt, read_start(args.start), args.max_new_tokens, args.temperature, args.top_k,
                   args.seed, args.data_dir, args.device, args.num_samples, use_cache=not args.no_cache)
    if args.json:
        print(json.dumps({"samples": texts}))
    else:
        for text in texts:
            print(text)
            print(SEPARATOR)
    return 0


def cli(argv=None):
    """main() with user errors as one line on stderr and exit status 2."""
    return run_cli(main, argv, user_errors=(EvalError, CheckpointError))


if __name__ == "__main__":
    sys.exit(cli())
