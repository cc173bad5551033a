"""
Routers: who decides which experts see which tokens (or, for Lory, which
merge weights each segment uses).

A router looks at hidden states and returns a `Routing`: a flat list of
(token, expert, gate) assignments that survived capacity, its *unweighted*
auxiliary losses, and detached statistics. It writes nothing to globals and
keeps no counters; the only state is the DeepSeek-V3 selection bias, which
train.py updates explicitly after each optimizer step. The expert computation
itself lives in experts.py.

Router types (see docs/METHODS.md sections 2, 3, 5, 6):
    topk_softmax   Mixtral: g = softmax(z[topk])  (= softmax -> topk -> renormalise,
                   Skywork-MoE eq. 2). With identical experts the layer equals the dense FFN.
    softmax_topk   GShard/Switch: g = softmax(z)[topk], no renormalisation (sum < 1).
    sigmoid        DeepSeek-V3: s = sigmoid(z); select top-k of s + b; g = s[topk]/sum.
    expert_choice  Zhou et al. 2022: each expert takes its top-C tokens. NOT causal:
                   the choice for token t depends on tokens after t in the batch, so
                   eval and generation use token-choice top-k on the same logits
                   instead, with k = capacity_factor (the experts per token it trained with).
    lory           Lory (arXiv 2405.03133): causal segment routing -> merge weights.
The file reads top-down: the token-choice top-k core (Routing, losses, capacity,
Router.forward), then the other router kinds, statistics, Lory's SegmentRouter and
Skywork-MoE's adaptive loss coefficients.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTERS = ("topk_softmax", "softmax_topk", "sigmoid", "expert_choice", "lory")
DROP_POLICIES = ("probs", "position")


@dataclass
class Routing:
    """One MoE layer's routing decision for a flat batch of T tokens.

    token_idx, expert_idx, gates: (A,) the A kept assignments (dropped ones are
    simply absent). gates carry gradient back to the router logits.
    aux_losses: unweighted scalar losses {'switch', 'skywork', 'z'}.
    stats: detached diagnostics (tokens_per_expert (E,), drop_rate, ...).
    """
    token_idx: torch.Tensor
    expert_idx: torch.Tensor
    gates: torch.Tensor
    aux_losses: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


# -----------------------------------------------------------------------------
# losses (docs/METHODS.md section 3). All take fp32 tensors.

def switch_loss(probs, tokens_per_expert_demand, k):
    """Switch Transformer load-balancing loss, arXiv 2101.03961 eq. 4:
    L = E * sum_i f_i * P_i with f_i the fraction of the k*T assignments sent to
    expert i (counted before dropping) and P_i the mean router probability.
    Equals 1 at perfectly uniform routing, grows with imbalance."""
    T, E = probs.shape
    f = tokens_per_expert_demand / (k * T)          # (E,) no gradient
    P = probs.mean(dim=0)                           # (E,)
    return E * torch.sum(f * P)


def skywork_loss(probs):
    """Skywork-MoE eq. 4: L = sum_i (1/E - mean_t g_ti)^2."""
    E = probs.shape[1]
    return torch.sum((1.0 / E - probs.mean(dim=0)) ** 2)


def z_loss(logits):
    """ST-MoE router z-loss (arXiv 2202.08906 eq. 5): mean_t (logsumexp_i z_ti)^2."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


# -----------------------------------------------------------------------------
# capacity

def expert_capacity(n_tokens, n_experts, top_k, capacity_factor):
    """C = ceil(k * T / E * capacity_factor); None means dropless (factor <= 0).
    (Rounded to 9 decimals before the ceil: 100 / 2 * 1.1 is 55.000000000000007 in
    floating point, and C is 55.)"""
    if capacity_factor <= 0:
        return None
    return math.ceil(round(top_k * n_tokens / n_experts * capacity_factor, 9))


def capacity_keep_mask(expert_idx, priority, n_experts, capacity):
    """Which of the flat assignments fit in their expert's capacity.

    expert_idx: (A,) expert of each assignment, in token order (t-major).
    priority:   (A,) higher is kept first, or None for 'by position' (earlier first).
    Returns a bool mask (A,). Vectorised: sort by (expert, -priority), rank within
    expert, keep rank < capacity.
    """
    A = expert_idx.numel()
    if priority is None:
        order = torch.arange(A, device=expert_idx.device)
    else:
        order = torch.argsort(priority, descending=True, stable=True)
    order = order[torch.argsort(expert_idx[order], stable=True)]   # grouped by expert
    counts = torch.bincount(expert_idx, minlength=n_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(A, device=expert_idx.device) - starts[expert_idx[order]]
    keep = torch.zeros(A, dtype=torch.bool, device=expert_idx.device)
    keep[order] = rank < capacity
    return keep


# -----------------------------------------------------------------------------

class Router(nn.Module):
    """Token-level router for the routed MoE layer (all types but 'lory').

    weight (E, d) is kept in fp32 and the logits are computed with autocast
    disabled, whatever the model's compute dtype (router precision matters:
    Llama 3 meets MoE and Megatron both keep it in fp32).
    """

    def __init__(self, n_embd, n_experts, top_k, router_type="topk_softmax",
                 capacity_factor=0.0, eval_capacity_factor=0.0, drop_policy="probs",
                 gate_norm_lambda=None, noisy=False, init_std=0.02):
        super().__init__()
        assert router_type in ROUTERS and router_type != "lory", router_type
        self.n_experts, self.top_k, self.router_type = n_experts, top_k, router_type
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.drop_policy, self.gate_norm_lambda, self.noisy = drop_policy, gate_norm_lambda, noisy
        self.weight = nn.Parameter(torch.empty(n_experts, n_embd))
        self.init_std = init_std
        # expert choice in eval mode: False = causal token-choice fallback (k = capacity_factor),
        # True = the training routing (batch-wise top-C per expert), for eval to report both
        self.eval_expert_choice = False
        # False while generating (model.inference_routing): forward returns the routing
        # decision only, without the auxiliary losses and diagnostics nobody reads there
        self.with_stats = True
        if noisy:   # Shazeer et al. 2017 eq. 4: H = z + N(0,1) * softplus(W_noise x)
            self.noise_weight = nn.Parameter(torch.zeros(n_experts, n_embd))
        if router_type == "sigmoid":
            # selection-only bias (DeepSeek-V3 aux-loss-free balancing): a buffer,
            # never trained by gradient, updated by update_expert_bias().
            self.register_buffer("expert_bias", torch.zeros(n_experts))
        self.reset_parameters()

    def reset_parameters(self):
        init_router_weight(self.weight, self.init_std)

    def gate_logits(self, x):
        """x: (T, d) -> raw router logits z (T, E) in fp32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())

    def forward(self, x):
        """x: (T, d) -> Routing. Token-choice top-k: each token picks the k experts with
        the highest logits; with a capacity C per expert the overflow is dropped,
        lowest router probability first (drop_policy "probs") or latest token first
        ("position"). Expert choice (training) routes in _expert_choice instead."""
        T, E = x.shape[0], self.n_experts
        logits = self.gate_logits(x)                                    # (T, E) raw
        z = self.normalise(self.add_noise(x, logits))                   # (T, E)
        if self.router_type == "expert_choice" and (self.training or self.eval_expert_choice):
            return self._expert_choice(logits, z, self.capacity_factor)
        k = self.experts_per_token()
        probs, gates, topi = self.top_k_gates(z, k)                     # (T, E), (T, k), (T, k)
        token_idx = torch.arange(T, device=x.device).repeat_interleave(k)   # (T*k,) a = t * k + j
        expert_idx, flat_gates = topi.reshape(-1), gates.reshape(-1)    # (T*k,)
        C = expert_capacity(T, E, k, self.capacity_factor if self.training else self.eval_capacity_factor)
        if C is None and not self.with_stats:   # generation: the decision is all that is used
            return Routing(token_idx, expert_idx, flat_gates)
        demand = torch.bincount(expert_idx, minlength=E)                # (E,) before dropping
        if C is not None and C < T * k:
            priority = None if self.drop_policy == "position" else probs.gather(-1, topi).reshape(-1).detach()
            keep = capacity_keep_mask(expert_idx, priority, E, C)
            token_idx, expert_idx, flat_gates = token_idx[keep], expert_idx[keep], flat_gates[keep]
        aux, stats = self.losses_and_stats(logits, probs, expert_idx, demand, k, C)
        return Routing(token_idx, expert_idx, flat_gates, aux, stats)

    def top_k_gates(self, z, k):
        """z (T, E) -> probs (T, E) (the distribution the losses and stats read), gates
        (T, k) and the chosen experts topi (T, k)."""
        if self.router_type == "sigmoid":
            return self._sigmoid_gates(z, k)
        probs = F.softmax(z, dim=-1)                                    # (T, E)
        if self.router_type == "topk_softmax":
            topv, topi = z.topk(k, dim=-1)
            return probs, F.softmax(topv, dim=-1), topi                 # gates sum to 1
        gates, topi = probs.topk(k, dim=-1)   # softmax_topk (and expert choice at eval): sum < 1
        return probs, gates, topi

    def losses_and_stats(self, logits, probs, expert_idx, demand, k, C):
        """The unweighted auxiliary losses and the detached statistics of one routing.
        expert_idx: (A,) kept assignments; demand: (E,) assignments before dropping."""
        T = logits.shape[0]
        tokens_per_expert = torch.bincount(expert_idx, minlength=self.n_experts)
        aux = {
            "switch": switch_loss(probs, demand.float(), k),
            "skywork": skywork_loss(probs),
            "z": z_loss(logits),
        }
        stats = routing_stats(logits, probs, tokens_per_expert, T * k - expert_idx.numel(), T * k, demand)
        stats["adaptive_drop_rate"] = self._adaptive_drop_rate(stats["drop_rate"], demand, T, k, C)
        return aux, stats

    # ------------------------------------------------------- the other router kinds
    def add_noise(self, x, z):
        """Noisy top-k gating (Shazeer et al. 2017 eq. 4), training only:
        H = z + N(0, 1) * softplus(W_noise x)."""
        if not (self.noisy and self.training):
            return z
        with torch.autocast(device_type=x.device.type, enabled=False):
            noise_std = F.softplus(F.linear(x.float(), self.noise_weight.float()))
        return z + torch.randn_like(z) * noise_std

    def normalise(self, z):
        """Skywork-MoE eq. 6 gating logit normalisation:
        z~ = lambda * (z - mean(z)) / std(z), per token over the E logits."""
        if self.gate_norm_lambda is None:
            return z
        mu = z.mean(dim=-1, keepdim=True)
        sd = z.std(dim=-1, keepdim=True)
        return self.gate_norm_lambda * (z - mu) / (sd + 1e-6)

    def experts_per_token(self):
        """k: top_k, or for expert choice at eval (token-choice fallback) capacity_factor,
        the experts per token it trained with, with softmax-then-topk gates as Lory's
        baseline does."""
        if self.router_type == "expert_choice":
            return expert_choice_k(self.capacity_factor, self.n_experts)
        return self.top_k

    def _sigmoid_gates(self, z, k):
        """DeepSeek-V3 (arXiv 2412.19437 section 2.1.2): s = sigmoid(z); the bias b only
        selects (top-k of s + b); g = s[topk] / sum. probs = s / sum(s) for losses/stats."""
        scores = torch.sigmoid(z)                                       # (T, E)
        topi = (scores + self.expert_bias).topk(k, dim=-1).indices      # bias: selection only
        topv = scores.gather(-1, topi)
        gates = topv / topv.sum(-1, keepdim=True).clamp_min(1e-20)
        return scores / scores.sum(-1, keepdim=True), gates, topi

    def _adaptive_drop_rate(self, drop_rate, demand, T, k, C):
        """The drop rate AdaptiveAuxCoef reads: the actual one when there is a
        capacity, else (dropless) the share of assignments that capacity factor 1
        would drop, from the demand. A dropless layer always drops 0, which would
        switch Skywork's balancing off (alpha -> 0)."""
        if C is not None:
            return drop_rate
        C1 = expert_capacity(T, self.n_experts, k, 1.0)
        return capacity_overflow(demand, C1) / (T * k)

    def _expert_choice(self, logits, z, capacity_factor):
        """Expert choice (arXiv 2202.09368): S = softmax(z) (T, E); each expert takes
        its top-C tokens by S (column-wise), C = ceil(T * capacity_factor / E).
        Balanced by construction, so no auxiliary loss is needed (z-loss kept)."""
        T, E = z.shape
        probs = F.softmax(z, dim=-1)                                    # (T, E)
        C = min(T, expert_capacity(T, E, 1, capacity_factor))
        gates, tok = probs.t().topk(C, dim=-1)                          # (E, C)
        expert_idx = torch.arange(E, device=z.device).repeat_interleave(C)
        token_idx = tok.reshape(-1)
        covered = torch.zeros(T, dtype=torch.bool, device=z.device)
        covered[token_idx] = True
        zero = logits.new_zeros(())
        aux = {"switch": zero, "skywork": zero, "z": z_loss(logits)}
        stats = routing_stats(logits, probs, torch.full((E,), C, device=z.device), 0, T)
        stats["drop_rate"] = 1.0 - covered.float().mean()               # tokens no expert took
        stats["adaptive_drop_rate"] = stats["drop_rate"]
        return Routing(token_idx, expert_idx, gates.reshape(-1), aux, stats)

    @torch.no_grad()
    def update_expert_bias(self, demand_per_expert, gamma=1e-3):
        """DeepSeek-V3 aux-loss-free balancing (arXiv 2412.19437 section 2.1.2):
        b_i += gamma * sign(mean_load - load_i). Call after the optimizer step with
        the step's training stats["demand_per_expert"]: the load *assigned* by the
        biased top-k, before capacity dropping. The kept load is clipped at the
        capacity C and can flip a sign: demand [40, 14, 3, 3] with C = 19 keeps
        [19, 14, 3, 3], whose mean 9.75 would push under-loaded expert 1 down."""
        load = demand_per_expert.float().to(self.expert_bias.device)
        self.expert_bias += gamma * torch.sign(load.mean() - load)


# -----------------------------------------------------------------------------
# statistics and helpers

def capacity_overflow(demand, capacity):
    """Assignments that a capacity of C per expert would drop: sum_i max(demand_i - C, 0).
    demand: (E,) assignments per expert before dropping."""
    return (demand.float() - capacity).clamp_min(0).sum()


def _cv(load):
    """Coefficient of variation std/mean (population std; 0 = balanced)."""
    return load.std(unbiased=False) / load.mean().clamp_min(1e-9)


@torch.no_grad()
def routing_stats(logits, probs, tokens_per_expert, n_dropped, n_assign, demand=None):
    """Detached diagnostics of one layer (docs/METHODS.md sections 2.1, 5 and 8).

    probs: (T, E) the gate distribution over all experts (after any logit
    normalisation). tokens_per_expert: (E,) kept assignments per expert.
    demand: (E,) assignments per expert before capacity dropping (default: the
    kept ones). load_cv is on the kept load, demand_cv on the demand; only the
    latter is comparable across capacity factors (a capacity clips the load).
    """
    E = probs.shape[1]
    load = tokens_per_expert.float()
    demand = load if demand is None else demand.float()
    entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1).mean()
    stats = {
        "tokens_per_expert": load,
        "demand_per_expert": demand,
        "drop_rate": torch.tensor(n_dropped / max(n_assign, 1)),
        "gate_entropy": entropy,
        "load_cv": _cv(load),
        "demand_cv": _cv(demand),
        "logit_abs": logits.abs().mean(),
    }
    if E >= 2:
        top = probs.topk(min(3, E), dim=-1).values.clamp_min(1e-20)  # (T, 3) sorted
        stats["max1_max2"] = (top[:, 0] / top[:, 1]).mean()
        if E >= 3:
            stats["max2_max3"] = (top[:, 1] / top[:, 2]).mean()
    return stats


def expert_choice_k(capacity_factor, n_experts):
    """Experts per token of expert choice's token-choice eval fallback: k = capacity_factor.
    Training gives each token capacity_factor experts on average (E experts x
    C = T * capacity_factor / E tokens), so a whole capacity_factor in 1..E is needed
    for eval to run the compute the model trained with. Raises ValueError (one line)."""
    cf = float(capacity_factor)
    if cf != int(cf) or not 1 <= cf <= n_experts:
        raise ValueError(f"router='expert_choice' trains with capacity_factor experts per token on average and "
                         f"evaluates token-choice top-k with k = capacity_factor: capacity_factor={capacity_factor} "
                         f"must be a whole number from 1 to n_experts={n_experts}")
    return int(cf)


def init_router_weight(weight, std):
    """A new router: normal(0, std), or zeros when std <= 0 (all experts tie)."""
    if std > 0:
        nn.init.normal_(weight, std=std)
    else:
        nn.init.zeros_(weight)


class SegmentRouter(nn.Module):
    """Lory causal segment routing (arXiv 2405.03133 section 3.1, eq. 3).

    Split each sequence into segments of segment_len tokens. The merge weights of
    segment j are softmax(R(mean h_{S_{j-1}})): they depend only on the previous
    segment, so segment j never sees its own future. Segment 1 has no previous
    segment: first_segment="self" uses its own mean with a stop-gradient on
    R(mean h_{S_1}) (Lory's rule, section 3.1: the whole router output is a
    constant, so neither the router weight nor segment 1's hidden states, nor
    the layers below them, learn through it; the forward pass still lets
    segment 1 see its own future at training time), first_segment="uniform"
    gives it uniform weights (fully causal).
    """

    def __init__(self, n_embd, n_experts, segment_len, first_segment="self", init_std=0.02):
        super().__init__()
        self.n_experts, self.segment_len, self.first_segment = n_experts, segment_len, first_segment
        self.weight = nn.Parameter(torch.empty(n_experts, n_embd))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self):
        init_router_weight(self.weight, self.init_std)

    def _weights(self, h_mean):
        with torch.autocast(device_type=h_mean.device.type, enabled=False):
            return F.softmax(F.linear(h_mean.float(), self.weight.float()), dim=-1)

    def forward(self, x):
        """x: (B, T, d), T a multiple of segment_len -> merge weights (B, S, E)."""
        B, T, d = x.shape
        S = T // self.segment_len
        seg_mean = x.view(B, S, self.segment_len, d).mean(dim=2)       # (B, S, d)
        w_prev = self._weights(seg_mean[:, :-1])                        # (B, S-1, E) for segments 2..S
        if self.first_segment == "uniform":
            w_first = x.new_full((B, 1, self.n_experts), 1.0 / self.n_experts, dtype=torch.float32)
        else:
            # Lory section 3.1: stop-gradient on R(mean h_{S_1}), the router output,
            # not only on R's weight: no gradient reaches segment 1's hidden states
            w_first = self._weights(seg_mean[:, :1]).detach()
        return torch.cat([w_first, w_prev], dim=1)                      # (B, S, E)

    def prompt_weights(self, x):
        """Inference (Lory section 3.4): one set of weights from the prompt's mean
        hidden state, reused for every generated token. x: (B, P, d) -> (B, E)."""
        return self._weights(x.mean(dim=1))

    @torch.no_grad()
    def stats(self, weights):
        """weights (B, S, E) -> detached diagnostics: mean weight per expert,
        entropy, number of active experts (weight > 2/E, Lory section 5)."""
        E = weights.shape[-1]
        w = weights.reshape(-1, E).float()
        return {
            "merge_weight_mean": w.mean(0),
            "merge_entropy": -(w * torch.log(w.clamp_min(1e-20))).sum(-1).mean(),
            "active_experts": (w > 2.0 / E).float().sum(-1).mean(),
        }


class AdaptiveAuxCoef:
    """Skywork-MoE section 3.2 adaptive auxiliary-loss coefficients (eq. 5):
    one alpha per MoE layer, updated every step from that layer's drop rate d_l:
        target_l = min(xi * d_l, alpha_max)
        alpha_l <- beta * alpha_l + (1 - beta) * target_l
    The coefficient saturates once a layer drops more than alpha_max/xi = 5%.
    Saved in the checkpoint (state_dict) so that resume is exact.

    Feed it each layer's Routing.stats["adaptive_drop_rate"]: the actual drop rate
    when the layer has a capacity, and when it is dropless (capacity_factor <= 0)
    the drop rate capacity factor 1 would give on the same demand. A dropless
    layer's own drop rate is always 0, which would decay alpha as
    alpha_max * beta^n (0.00049 after 300 steps) and silently switch balancing off.
    """

    def __init__(self, n_layers, xi=0.2, alpha_max=0.01, beta=0.99, alpha_init=0.01):
        self.xi, self.alpha_max, self.beta = xi, alpha_max, beta
        self.alpha = [float(alpha_init)] * n_layers

    def update(self, drop_rates):
        for l, d in enumerate(drop_rates):
            target = min(self.xi * float(d), self.alpha_max)
            self.alpha[l] = self.beta * self.alpha[l] + (1 - self.beta) * target
        return list(self.alpha)

    def state_dict(self):
        return {"alpha": list(self.alpha), "xi": self.xi, "alpha_max": self.alpha_max, "beta": self.beta}

    def load_state_dict(self, sd):
        self.alpha = [float(a) for a in sd["alpha"]]
        self.xi, self.alpha_max, self.beta = sd["xi"], sd["alpha_max"], sd["beta"]
