"""Expert parallelism (parallel.py) on CPU with gloo, in spawned processes.

A small harness (build model, shard, forward/backward, sync, clip, AdamW) runs the
same steps as one process doing gradient accumulation over the same micro-batches
(the reference: micro-batch r of a step is what rank r takes, as train.py's
get_batch assigns them). Each spawned test has a free port and a deadline, so a
broken test fails instead of hanging."""
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import parallel
from model import GPT, GPTConfig
from upcycle import upcycle_state_dict

CFG = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, moe_layers="all",
           n_experts=8, top_k=2, expert_impl="grouped")
VARIANTS = {"topk_softmax": {}, "softmax_topk": {"router": "softmax_topk"},
            "capacity": {"capacity_factor": 1.0},      # drops tokens: asserted below
            "one_rank": {"router_init_std": 0.0}}  # tied logits: in step 1 every token picks the same two
                                               # experts, so the other ranks receive no rows (empty splits)
B = 4            # sequences per micro-batch
# AdamW divides by sqrt(v): an expert weight whose gradient nearly cancels has a
# large relative rounding error, which lr turns into a parameter difference. At
# lr=1e-2 that reached 1.1e-5 after 3 steps (EP=2 x DP=2, grads equal to 2e-11);
# train.py's learning rates are 1e-3 to 2e-3.
LR, CLIP = 1e-3, 0.5
DEADLINE_S = 120


def config(variant):
    return GPTConfig(**{**CFG, **VARIANTS[variant]})


def micro_batch(step, m, n_micro):
    """Micro-batch m of step `step` (every rank draws the whole step identically)."""
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, CFG["vocab_size"], (n_micro * B, CFG["block_size"] + 1), generator=g)
    x = data[m * B:(m + 1) * B]
    return x[:, :-1], x[:, 1:]


def losses_of(model, x, y):
    """(cross-entropy, what is differentiated: CE + Switch + z losses)."""
    _, loss, routings = model(x, y)
    aux = sum(1e-2 * r.aux_losses["switch"] + 1e-3 * r.aux_losses["z"] for r in routings)
    return loss, loss + aux, routings


def make_opt(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


# ---------------------------------------------------------------- reference: one process

def reference_step(model, opt, step, n_micro):
    """One optimizer step over n_micro micro-batches with gradient accumulation.
    Returns (mean CE, grads before clipping, grad norm, drop rate)."""
    lossf, drops = 0.0, 0.0
    for m in range(n_micro):
        x, y = micro_batch(step, m, n_micro)
        loss, total, routings = losses_of(model, x, y)
        (total / n_micro).backward()
        lossf += loss.item() / n_micro
        drops += sum(float(r.stats["drop_rate"]) for r in routings)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return lossf, grads, float(norm), drops


def reference_run(variant, n_micro, steps=3):
    torch.manual_seed(0)
    model = GPT(config(variant))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_opt(model)
    out = [reference_step(model, opt, s, n_micro) for s in range(steps)]
    moved = max((model.state_dict()[k] - v).abs().max().item() for k, v in start.items())
    return [o[0] for o in out], out[0][1], out[0][2], out[0][3], model.state_dict(), moved


# ---------------------------------------------------------------- EP ranks

def ep_step(model, opt, ep, step):
    """The same step on one EP rank: its own micro-batch, then sync, clip, AdamW.
    Returns (mean CE over the world, full grads before clipping, grad norm)."""
    x, y = micro_batch(step, ep.rank, ep.world)
    loss, total, _ = losses_of(model, x, y)
    total.backward()
    parallel.sync_gradients(model, ep)
    experts = set(parallel.expert_param_names(model))
    grads = {n: (parallel._gather_experts(p.grad, ep) if n in experts else p.grad.clone())
             for n, p in model.named_parameters()}
    norm = parallel.clip_grad_norm(model, ep, CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t = loss.detach().clone()
    dist.all_reduce(t)
    return t.item() / ep.world, grads, float(norm)


def worker_main(name, rank, world, port, out_dir, *args):
    """Entry point of a spawned rank: one thread, the traceback in out_dir/error{rank}.txt
    and a non-zero exit on any error."""
    torch.set_num_threads(1)
    try:
        WORKERS[name](rank, world, port, out_dir, *args)
    except BaseException as e:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        os._exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()


def _init(rank, world, port, ep_size, timeout_s=30):
    return parallel.init_distributed(ep_size, "gloo", timeout_s=timeout_s, init_method=f"tcp://127.0.0.1:{port}",
                                     rank=rank, world_size=world)


def _match_worker(rank, world, port, out_dir, ep_size):
    ep = _init(rank, world, port, ep_size)
    results = {}
    for variant in VARIANTS:
        torch.manual_seed(0 if rank < ep_size else 7)   # replicas outside the first EP group start wrong:
        model = parallel.build_sharded_model(config(variant), ep)
        parallel.broadcast_parameters(model, ep)        # ... and get the first group's weights here
        opt = make_opt(model)
        out = [ep_step(model, opt, ep, s) for s in range(3)]
        results[variant] = ([o[0] for o in out], out[0][1], out[0][2], parallel.full_state_dict(model, ep))
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "ep.pt"))


def _resume_worker(rank, world, port, out_dir, ep_size):
    """Phase 1: resume the one-process checkpoint A at EP; phase 2: train 2 steps from
    scratch at EP and save checkpoint B (full stacks, global expert order)."""
    ep = _init(rank, world, port, ep_size)
    cfg = config("topk_softmax")
    a = torch.load(os.path.join(out_dir, "A.pt"))
    model = parallel.build_sharded_model(cfg, ep, parallel.shard_state_dict(a["model"], cfg, ep))
    opt = make_opt(model)
    opt.load_state_dict(parallel.shard_optimizer_state(a["optimizer"], opt, model, ep))
    resumed = [ep_step(model, opt, ep, s)[0] for s in (2, 3)]
    torch.manual_seed(0)
    model = parallel.build_sharded_model(cfg, ep)
    opt = make_opt(model)
    for s in (0, 1):
        ep_step(model, opt, ep, s)
    ckpt = {"model": parallel.full_state_dict(model, ep), "optimizer": parallel.full_optimizer_state(opt, model, ep)}
    if rank == 0:
        torch.save(ckpt, os.path.join(out_dir, "B.tmp"))
        os.replace(os.path.join(out_dir, "B.tmp"), os.path.join(out_dir, "B.pt"))
        torch.save(resumed, os.path.join(out_dir, "resumed.pt"))


def _failing_worker(rank, world, port, out_dir):
    ep = _init(rank, world, port, world, timeout_s=10)
    model = parallel.build_sharded_model(config("topk_softmax"), ep)
    opt = make_opt(model)
    ep_step(model, opt, ep, 0)
    if rank == 1:
        raise RuntimeError("rank 1 fails mid-run")
    ep_step(model, opt, ep, 1)   # rank 0 waits in the all-to-all for a rank that is gone


def _mismatch_worker(rank, world, port, out_dir):
    ep = _init(rank, world, port, world)
    parallel.check_same_config({**CFG, "top_k": 2 if rank == 0 else 1}, ep)


WORKERS = {"match": _match_worker, "resume": _resume_worker, "failing": _failing_worker,
           "mismatch": _mismatch_worker}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(name, world, out_dir, *args, deadline=DEADLINE_S):
    """Start `world` processes, wait at most `deadline` seconds; returns exit codes
    (None for a process that was still running and got killed)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker_main, args=(name, r, world, port, str(out_dir), *args)) for r in range(world)]
    for p in procs:
        p.start()
    end = time.time() + deadline
    for p in procs:
        p.join(max(0.0, end - time.time()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


def errors(out_dir):
    return "\n".join(open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.startswith("error"))


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 4), (4, 2)], ids=["ep2", "ep4", "ep2xdp2"])
def test_expert_parallel_matches_one_process(tmp_path, world, ep_size):
    codes = spawn("match", world, tmp_path, ep_size)
    assert codes == [0] * world, f"exit codes {codes}\n{errors(tmp_path)}"
    got = torch.load(tmp_path / "ep.pt")
    for variant in VARIANTS:
        losses, grads, norm, drops, state, moved = reference_run(variant, world)
        ep_losses, ep_grads, ep_norm, ep_state = got[variant]
        if variant == "capacity":
            assert drops > 0, "the capacity variant must drop tokens"
        assert moved > 100 * 1e-5, "the parameters must move far more than the tolerance"
        assert norm > CLIP, "clipping must be active for the test to cover it"
        torch.testing.assert_close(torch.tensor(ep_losses), torch.tensor(losses), rtol=0, atol=1e-6)
        assert ep_norm == pytest.approx(norm, rel=1e-5)
        assert set(ep_grads) == set(grads)
        for n in grads:   # after one step, every parameter's gradient, expert stacks in global order
            torch.testing.assert_close(ep_grads[n], grads[n], rtol=0, atol=1e-5, msg=f"{variant} grad {n}")
        for n in state:   # after 3 AdamW steps
            torch.testing.assert_close(ep_state[n], state[n], rtol=0, atol=1e-5, msg=f"{variant} param {n}")


def test_checkpoint_is_world_size_independent(tmp_path):
    """One process saves after 2 steps (A); EP=2 resumes A for steps 3-4. EP=2 trains
    2 steps and saves B (full stacks by global expert index); one process resumes B.
    Both continuations equal the uninterrupted one-process run."""
    torch.manual_seed(0)
    cfg = config("topk_softmax")
    model = GPT(cfg)
    opt = make_opt(model)
    losses = []
    for s in range(4):
        losses.append(reference_step(model, opt, s, 2)[0])
        if s == 1:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "A.pt")
    codes = spawn("resume", 2, tmp_path, 2)
    assert codes == [0, 0], f"exit codes {codes}\n{errors(tmp_path)}"
    torch.testing.assert_close(torch.tensor(torch.load(tmp_path / "resumed.pt")), torch.tensor(losses[2:]),
                               rtol=0, atol=1e-6)
    a, b = torch.load(tmp_path / "A.pt"), torch.load(tmp_path / "B.pt")
    for k in a["model"]:   # local experts saved as 0..E/N-1 would mismatch here
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=1e-5, msg=k)
    one = GPT(cfg)
    one.load_state_dict(b["model"])
    opt = make_opt(one)
    opt.load_state_dict(b["optimizer"])
    after_b = [reference_step(one, opt, s, 2)[0] for s in (2, 3)]
    torch.testing.assert_close(torch.tensor(after_b), torch.tensor(losses[2:]), rtol=0, atol=1e-6)


def test_a_failing_rank_ends_every_rank(tmp_path):
    codes = spawn("failing", 2, tmp_path, deadline=60)
    assert None not in codes, f"a rank was still running after the deadline: {codes}"
    assert all(c != 0 for c in codes), codes
    assert "rank 1 fails mid-run" in errors(tmp_path)


def test_mismatched_config_is_one_clear_error(tmp_path):
    codes = spawn("mismatch", 2, tmp_path, deadline=60)
    assert codes == [1, 1], f"{codes}\n{errors(tmp_path)}"
    first = errors(tmp_path).splitlines()[0]
    assert first.startswith("ValueError: ranks [1] run a different config than rank 0"), first


# ---------------------------------------------------------------- in-process (no process group)

def fake_ep(ep_rank, ep_size):
    return parallel.EPGroups(world=ep_size, rank=ep_rank, ep_size=ep_size, ep_rank=ep_rank)


def test_refusals_are_one_line():
    lory = GPTConfig(**{**CFG, "router": "lory", "segment_len": 8})
    with pytest.raises(ValueError, match="expert_parallel does not apply to router='lory'"):
        parallel.check_ep_config(lory, 2)
    parallel.check_ep_config(lory, 1)
    with pytest.raises(ValueError, match="n_experts=8 must be divisible by expert_parallel=3"):
        parallel.check_ep_config(GPTConfig(**CFG), 3)
    with pytest.raises(ValueError, match=r"must divide the number of processes \(6\)"):
        parallel.check_ep_config(GPTConfig(**CFG), 4, world=6)


def test_shards_take_global_expert_slices():
    cfg = GPTConfig(**CFG)
    torch.manual_seed(0)
    full = GPT(cfg).state_dict()
    for r in range(4):
        local = parallel.shard_state_dict(full, cfg, fake_ep(r, 4))
        model = parallel.build_sharded_model(cfg, fake_ep(r, 4), local)
        assert model.lm_head.weight is model.tok_emb.weight
        got = model.state_dict()
        for k in parallel.expert_keys(cfg):
            assert torch.equal(got[k], full[k][2 * r:2 * r + 2]), k
        assert torch.equal(got["blocks.0.ffn.router.weight"], full["blocks.0.ffn.router.weight"])
        assert torch.equal(model.rope_cos, GPT(cfg).rope_cos)
        assert model.num_params(active=True) == GPT(cfg).num_params(active=True)   # MFU counts k experts
    one = parallel.build_sharded_model(cfg, fake_ep(0, 1), full)   # EP=1: every expert, plain DDP
    assert one.blocks[0].ffn.ep is None and torch.equal(one.state_dict()["blocks.1.ffn.up_proj"],
                                                        full["blocks.1.ffn.up_proj"])


def test_sharded_model_keeps_rope_scaling():
    # an imported Llama 3.1-style model (rope_scaling "llama3") trained under EP: the
    # rebuilt rotary tables must be the scaled ones GPT(cfg) computes
    cfg = GPTConfig(**{**CFG, "rope_theta": 500000.0, "rope_scaling": "llama3", "rope_factor": 8.0,
                       "rope_original_max_pos": 8})
    torch.manual_seed(0)
    full = GPT(cfg)
    model = parallel.build_sharded_model(cfg, fake_ep(1, 2), parallel.shard_state_dict(full.state_dict(), cfg, fake_ep(1, 2)))
    assert not torch.equal(full.rope_cos, GPT(GPTConfig(**{**CFG, "rope_theta": 500000.0})).rope_cos)
    assert torch.equal(model.rope_cos, full.rope_cos) and torch.equal(model.rope_sin, full.rope_sin)


def test_online_upcycling_builds_only_owned_experts():
    dense_args = {**CFG, "moe_layers": "none"}
    torch.manual_seed(0)
    dense = GPT(GPTConfig(**dense_args)).state_dict()
    options = {"model_args": {**CFG, "moe_layers": "all"}, "expert_noise": 0.1, "seed": 3}
    full, cfg, info = upcycle_state_dict(dense, dense_args, options)
    for r in range(2):
        local, cfg_r, info_r = parallel.upcycle_owned(dense, dense_args, options, fake_ep(r, 2))
        assert cfg_r == cfg and info_r == info
        for k in full:
            want = full[k][4 * r:4 * r + 4] if k in parallel.expert_keys(cfg) else full[k]
            assert torch.equal(local[k], want), k
        model = parallel.build_sharded_model(cfg, fake_ep(r, 2), local)
        assert model.blocks[0].ffn.gate_proj.shape[0] == 4 and model.blocks[0].ffn.ep is not None
