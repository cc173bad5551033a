"""
The reader's path: which lines a newcomer reads to answer three questions, with
their file:line ranges and line counts (docstrings included, blank lines between
pieces not counted). Pieces are named by function or class, so the ranges follow
the code as it moves; `python docs/reading_path.py` prints docs/READING.md's tables,
`--write` rewrites them there, and tests/test_reading_path.py checks the file is current
and the budgets hold.

A piece is "file:Name", "file:Class.method", "file:doc" (the module docstring) or
"file:Name@first marker@last marker" (the lines of Name from the line holding the
first marker to the line holding the last one).
"""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

UPCYCLE_CORE = [
    ("upcycle.py:doc", "what happens to the weights"),
    ("upcycle.py:upcycle_ffn", "one dense FFN -> E experts: the copy"),
    ("upcycle.py:new_router", "the new router rows"),
    ("upcycle.py:scale_experts", "weight scaling"),
    ("upcycle.py:upcycle_state_dict", "every MoE layer of a state dict"),
    ("upcycle.py:in_dtype_of", "the source's dtype kept"),
    ("upcycle.py:target_config", "the MoE shape from the dense one"),
]
STEP = [
    ("train.py:train@# ---- one optimizer step@run.iter_num += 1", "the step in the loop"),
    ("train.py:get_lr", "the learning rate"),
    ("train.py:get_batch", "the step's micro-batches"),
    ("train.py:forward_backward", "loss (+ the routers' aux losses), backward per micro-batch"),
    ("train.py:aux_total", "the routers' losses, weighted (none for a dense model)"),
    ("parallel.py:Dist.sync_on_backward", "DDP's gradient sync on the last micro-batch"),
    ("parallel.py:Dist.mean", "the global batch's loss"),
    ("parallel.py:Dist.clip_and_step", "clip, optimizer step"),
    ("parallel.py:step_and_zero", "the optimizer step"),
    ("diagnostics.py:LogWindow.add", "the log window"),
]
MODEL_FORWARD = [
    ("model.py:GPT.forward", "the model's forward"),
    ("model.py:Block.forward", "one block"),
    ("model.py:RMSNorm.forward", "RMSNorm"),
    ("model.py:apply_rope", "RoPE"),
    ("model.py:Attention.forward", "attention"),
    ("model.py:SwiGLU.forward", "the dense FFN"),
]
ROUTING = [   # token-choice top-k, dropless: the default run
    ("router.py:Routing", "the decision: kept (token, expert, gate) triples, losses, stats"),
    ("router.py:switch_loss", "the load-balancing loss"),
    ("router.py:z_loss", "the router z-loss"),
    ("router.py:expert_capacity", "how many tokens an expert may take (None: dropless, the default)"),
]
ROUTER = [
    ("router.py:Router.gate_logits", "z = W h"),
    ("router.py:Router.forward", "token-choice top-k"),
    ("router.py:Router.top_k_gates", "top-k, then the gates"),
    ("router.py:Router.losses_and_stats", "the losses it returns"),
]
EXPERTS = [
    ("experts.py:moe_ffn_loop", "the reference: each expert on its tokens"),
    ("experts.py:moe_ffn", "dispatch to the loop or a faster path"),
]

# question -> (budget in lines, [(piece, why a reader needs it)])
PATHS = {
    "(a) how a token is routed and its experts computed": (260, [
        ("model.py:MoEFFN", "the MoE layer: flatten the tokens, ask the router, run the experts"),
        ("router.py:doc", "what a router returns and the router kinds"),
        *ROUTING,
        ("router.py:capacity_keep_mask", "which assignments survive capacity"),
        ("router.py:Router.__init__", "the router's settings"),
        *ROUTER,
        ("experts.py:doc", "what the expert functions compute"),
        *EXPERTS,
    ]),
    "(b) how a dense checkpoint becomes an MoE by copying (the CLI)": (300, [
        *UPCYCLE_CORE,
        ("upcycle.py:load_dense", "reading the dense checkpoint"),
        ("upcycle.py:source_record", "where the weights came from"),
        ("upcycle.py:upcycle_checkpoint", "the CLI's upcycle"),
        ("upcycle.py:write_step0_moe", "writing a step-0 MoE checkpoint"),
        ("upcycle.py:cli_plan", "flags -> options"),
        ("upcycle.py:cli_options", "flags -> options"),
        ("upcycle.py:main", "the CLI"),
    ]),
    "(b) the same, online in train.py": (210, [
        *UPCYCLE_CORE,
        ("upcycle.py:upcycle_model", "the same in memory"),
        ("upcycle.py:model_from_state", "a GPT holding the state"),
        ("upcycle.py:upcycle_from_checkpoint", "from a dense out_dir"),
        ("init_from.py:upcycle_options", "train.py's keys -> options"),
        ("init_from.py:upcycle_online", "online upcycling in train.py"),
        ("parallel.py:Dist.upcycle", "one process: the whole model"),
    ]),
    "(c) one MoE training step": (330, [
        *STEP,
        ("train.py:update_balancing", "sigmoid bias, Skywork's adaptive coefficients"),
        ("train.py:current_alphas", "the aux coefficients in force"),
        ("parallel.py:Dist.logged_loads", "expert loads for the log"),
        ("parallel.py:Dist.sum_", "summed expert demand"),
        ("diagnostics.py:StatsAccumulator.add", "routing statistics for the log"),
        *MODEL_FORWARD,
        ("model.py:MoEFFN", "the MoE layer"),
        *ROUTING,
        *ROUTER,
        *EXPERTS,
    ]),
    "(c) one dense training step": (180, [*STEP, *MODEL_FORWARD]),
}


def find(tree, dotted):
    """The ast node of Name or Class.method in a module."""
    node = tree
    for part in dotted.split("."):
        node = next((n for n in ast.iter_child_nodes(node)
                     if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.name == part), None)
        if node is None:
            raise KeyError(dotted)
    return node


def line_range(piece):
    """(file, first line, last line) of a piece (1-based, inclusive)."""
    path, name = piece.split(":", 1)
    with open(os.path.join(ROOT, path)) as f:
        src = f.read()
    tree = ast.parse(src)
    if name == "doc":
        return path, 1, tree.body[0].end_lineno
    name, *markers = name.split("@")
    node = find(tree, name)
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    if not markers:
        return path, first, node.end_lineno
    lines = src.splitlines()
    start = next(i for i in range(first, node.end_lineno + 1) if markers[0] in lines[i - 1])
    end = next(i for i in range(start, node.end_lineno + 1) if markers[1] in lines[i - 1])
    return path, start, end


def table(question):
    """(markdown lines, total line count) for one question."""
    budget, pieces = PATHS[question]
    rows, total = [], 0
    for piece, why in pieces:
        path, a, b = line_range(piece)
        total += b - a + 1
        rows.append(f"| `{piece.split('@')[0]}` | {path}:{a}-{b} | {b - a + 1} | {why} |")
    head = [f"### {question}: {total} lines (budget {budget})", "",
            "| piece | lines | n | why |", "|---|---|---|---|"]
    return head + rows, total


def render():
    out = []
    for q in PATHS:
        lines, _ = table(q)
        out += lines + [""]
    return "\n".join(out)


def write_guide(path=os.path.join(ROOT, "docs", "READING.md")):
    """Replace the tables of docs/READING.md (everything from the first question on)."""
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[:text.index("### (a)")] + render())


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_guide()
    else:
        sys.stdout.write(render())
