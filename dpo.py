"""
dpo.py: Direct Preference Optimization (notes 10.8; homework 2) and its relatives.

The policy pi_theta and a frozen reference pi_ref both start from the SFT model. On preference
pairs (x, y+, y-) labelled by the simulated labeller of reward.py, DPO minimises

    L_DPO = -log sigmoid(beta * (log pi_theta(y+|x)/pi_ref(y+|x) - log pi_theta(y-|x)/pi_ref(y-|x)))

which is the Bradley-Terry likelihood of the labels under the implicit reward
r_hat(x, y) = beta * log pi_theta(y|x) / pi_ref(y|x): the optimum of the KL-regularised objective
max E[r] - beta KL(pi || pi_ref) is pi* = pi_ref exp(r / beta) / Z(x), so r = beta log pi*/pi_ref +
beta log Z(x), and log Z(x) cancels in a difference of two responses to the same prompt.

Losses (--loss): sigmoid (DPO), ipo (squared: (h - 1/(2 beta))^2 on the log-ratio margin h),
hinge (SLiC: max(0, 1 - beta h)); --label_smoothing eps for the sigmoid loss (conservative DPO).
The Plackett-Luce form ranks K responses (homework 2(g)); with K = 2 it is DPO exactly.
"""
import torch
import torch.nn.functional as F


def dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta, loss="sigmoid", label_smoothing=0.0):
    """Per-pair losses (B,) and the implicit rewards beta * log pi/pi_ref of both responses (B,).
    Inputs are sequence log-probs (B,) of the chosen and rejected responses under the policy and
    the reference."""
    r_chosen = beta * (logp_chosen - ref_chosen)          # implicit reward r_hat(x, y+)
    r_rejected = beta * (logp_rejected - ref_rejected)    # implicit reward r_hat(x, y-)
    margin = r_chosen - r_rejected                        # beta * h
    if loss == "sigmoid":   # Bradley-Terry likelihood; eps: the label is flipped with probability eps
        losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    elif loss == "ipo":     # regress the log-ratio margin h onto 1 / (2 beta)
        losses = (margin / beta - 1 / (2 * beta)) ** 2
    elif loss == "hinge":   # SLiC: a margin of 1 in implicit reward
        losses = F.relu(1 - margin)
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    return losses, r_chosen, r_rejected


def plackett_luce_loss(logps, ref_logps, beta):
    """Negative log-likelihood of K responses ranked best first (B, K) under the Plackett-Luce model
    with the implicit rewards (homework 2(g)): -sum_k log( exp(r_k) / sum_{j >= k} exp(r_j) ).
    With K = 2 this is -log sigmoid(r_1 - r_2), the DPO loss."""
    r = beta * (logps - ref_logps)                                      # (B, K)
    tail_logsumexp = torch.logcumsumexp(r.flip(-1), -1).flip(-1)       # log sum_{j >= k} exp(r_j)
    return (tail_logsumexp - r)[:, :-1].sum(-1)                         # the last term is log 1 = 0
