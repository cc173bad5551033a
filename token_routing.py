"""
Which experts each token of a text goes to, layer by layer: the data behind the
token-level routing view (Mixtral, arXiv 2401.04088, section 5, fig. 8: the text
with each token coloured by its expert). This file measures; plot.py draws
(plot_token_routing: PNG, write_token_routing_html: HTML).

    model.eval()
    snippet = route_text(model, tokenizer, ids, name="code")    # one text
    snippets = val_snippet_routing(model, val_dataset)            # one val snippet per domain

A snippet is a JSON-serialisable dict:
    name       what the text is (the domain of a val snippet)
    kind       "routed" (top-k routers) or "lory" (segment merge weights)
    n_experts  E
    layers     the model's MoE layer indices, (L,)
    ids        token ids, (T,)
    pieces     each token's text, (T,): concatenated they give the decoded text; a
               token that ends inside a multi-byte character has "" (its bytes
               show up in the piece of the token that completes the character)
    experts    (L, T, k') each token's experts, highest gate first
    gates      (L, T, k') their gates
Routed layers list the assignments that survived capacity (k' <= top_k; an empty
list is a token all of whose assignments were dropped). Lory layers list the
segment's merge weights, the largest LORY_SHOWN of them.
"""
import numpy as np
import torch

from data.dataset import meta_dtype
from data.tokenizer import load_tokenizer

SNIPPET_TOKENS = 96     # tokens per val snippet
LORY_SHOWN = 4          # merge weights listed per Lory token


def token_pieces(tokenizer, ids):
    """The text of each token (list of T str), so that "".join(pieces) is the decoded
    text. Found by decoding growing prefixes: a prefix that ends inside a multi-byte
    UTF-8 character decodes to a trailing U+FFFD, which is left for the next token."""
    pieces, done = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[:i + 1]).rstrip("\ufffd")
        if text.startswith(done):
            pieces.append(text[len(done):])
        else:   # a decoder that rewrites earlier text (whitespace clean-up): the token alone
            pieces.append(tokenizer.decode(ids[i:i + 1]))
        done = text
    return pieces


def _routed_choices(routing, T):
    """Routing (one routed layer, one sequence of T tokens) -> per token
    (experts, gates), highest gate first."""
    tok, exp, gate = (t.detach().cpu() for t in (routing.token_idx, routing.expert_idx, routing.gates))
    per_token = [[] for _ in range(T)]
    for t, e, g in zip(tok.tolist(), exp.tolist(), gate.float().tolist()):
        per_token[t].append((g, e))
    ordered = [sorted(c, key=lambda ge: (-ge[0], ge[1])) for c in per_token]
    return [[e for _, e in c] for c in ordered], [[g for g, _ in c] for c in ordered]


def _lory_choices(merge_weights, T, segment_len):
    """Lory merge weights (1, S, E) -> per token the largest LORY_SHOWN weights of
    its segment (every token of a segment shares them)."""
    w = merge_weights[0].detach().float().cpu()                        # (S, E)
    top = w.topk(min(LORY_SHOWN, w.shape[1]), dim=-1)
    seg = [t // segment_len for t in range(T)]
    experts, gates = top.indices.tolist(), top.values.tolist()
    return [experts[s] for s in seg], [gates[s] for s in seg]


@torch.no_grad()
def route_tokens(model, ids):
    """Run the model (in eval mode) on one sequence of token ids and read each MoE
    layer's routing. Returns (layers, kind, experts (L, T, k'), gates (L, T, k'))."""
    if model.training:
        raise ValueError("route_tokens needs model.eval(): training routing adds noise and capacity drops")
    moe = model.moe_layers()
    if not moe:
        raise ValueError("a dense model has no routing to show: pass an MoE model")
    device = next(model.parameters()).device
    idx = torch.as_tensor(list(ids), dtype=torch.long, device=device)[None]   # (1, T)
    _, _, routings = model(idx)
    T, lory = idx.shape[1], isinstance(routings[0], dict)
    experts, gates = [], []
    for r in routings:
        e, g = (_lory_choices(r["merge_weights"], T, model.config.segment_len) if lory
                else _routed_choices(r, T))
        experts.append(e)
        gates.append(g)
    return [l for l, _ in moe], "lory" if lory else "routed", experts, gates


def route_text(model, tokenizer, ids, name=""):
    """One snippet dict (module docstring) for the token ids `ids`."""
    ids = [int(i) for i in ids]
    layers, kind, experts, gates = route_tokens(model, ids)
    return {"name": name, "kind": kind, "n_experts": model.config.n_experts, "layers": layers,
            "ids": ids, "pieces": token_pieces(tokenizer, ids), "experts": experts, "gates": gates}


def snippet_length(model, n_tokens=SNIPPET_TOKENS):
    """Tokens per snippet: n_tokens, at most block_size, whole Lory segments."""
    n = min(n_tokens, model.config.block_size)
    if model.config.router == "lory" and model.moe_layers():
        seg = model.config.segment_len
        n = max(seg, n - n % seg)
    return n


def val_snippets(ds, n):
    """One fixed snippet per domain of a TokenDataset: the first n tokens of the
    domain's first document that is longer than n tokens (else of its longest
    document, running on into the next). Returns [(domain name, ids)]."""
    tokens = np.memmap(ds.bin_path, dtype=meta_dtype(ds.meta), mode="r")
    out = []
    for d, name in enumerate(ds.domain_names):
        docs = ds.index[ds.index[:, 2] == d]                            # (n_docs, 3) offset, length, domain
        if len(docs) == 0:
            continue
        long = docs[docs[:, 1] > n]
        start = int(long[0, 0]) if len(long) else int(docs[np.argmax(docs[:, 1]), 0])
        start = min(start, len(tokens) - n)
        out.append((name, [int(t) for t in tokens[start:start + n]]))
    return out


def val_snippet_routing(model, ds, n_tokens=SNIPPET_TOKENS):
    """The routing of one fixed val snippet per domain (list of snippet dicts);
    [] for a dense model. ds: the TokenDataset the model is evaluated on."""
    if not model.moe_layers():
        return []
    tokenizer = load_tokenizer(ds.meta, ds.data_dir)
    n = snippet_length(model, n_tokens)
    return [route_text(model, tokenizer, ids, name) for name, ids in val_snippets(ds, n)]
