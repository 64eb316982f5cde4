"""The DeFrag objective written straight from its definition, one fragment pair at a time.

Slow on purpose: the reference the vectorised ``model.objective`` is checked against (tests) and timed against
(benchmarks/bench_objective.py).
"""
from __future__ import annotations

import math

import torch


def loop_pair_scores(iv, io, n_img, sv, so, n_sent, smooth=10.0, threshold=True):
    s = [[iv.new_zeros(()) for _ in range(n_sent)] for _ in range(n_img)]
    counts = [sum(1 for j in range(len(so)) if int(so[j]) == l) for l in range(n_sent)]
    for i in range(len(io)):
        for j in range(len(so)):
            d = iv[i] @ sv[j]
            k, l = int(io[i]), int(so[j])
            s[k][l] = s[k][l] + (torch.clamp(d, min=0) if threshold else d)
    return torch.stack([torch.stack([s[k][l] / (counts[l] + smooth) for l in range(n_sent)])
                        for k in range(n_img)]) if n_img and n_sent else iv.new_zeros(n_img, n_sent)


def loop_cost(iv, io, sv, so, P, use_fragment=True, use_global=True, use_mil=True, fragment_margin=1.0,
              fragment_scale=1.0, global_margin=40.0, global_scale=0.5, smooth=10.0, threshold_global=True):
    Ni, Ns = len(io), len(so)
    frag = iv.new_zeros(())
    if use_fragment:
        for j in range(Ns):
            ys = []
            for i in range(Ni):
                d = float((iv[i] @ sv[j]).detach())
                if int(io[i]) == int(so[j]):
                    ys.append((0.0 if d == 0 else math.copysign(1.0, d)) if use_mil else 1.0)
                else:
                    ys.append(-1.0)
            own = [i for i in range(Ni) if int(io[i]) == int(so[j])]
            if use_mil and own and not any(ys[i] == 1.0 for i in own):
                best = own[0]
                for i in own:
                    if float((iv[i] @ sv[j]).detach()) > float((iv[best] @ sv[j]).detach()):
                        best = i
                ys[best] = 1.0
            npos = sum(1 for y in ys if y == 1.0)
            nneg = sum(1 for y in ys if y == -1.0)
            for i in range(Ni):
                if ys[i] == 0.0:
                    continue
                w = 1.0 / npos if ys[i] == 1.0 else 1.0 / nneg
                frag = frag + fragment_scale * w * torch.clamp(fragment_margin - ys[i] * (iv[i] @ sv[j]), min=0)
    glob = iv.new_zeros(())
    if use_global:
        S = loop_pair_scores(iv, io, P, sv, so, P, smooth, threshold_global)
        for k in range(P):
            for l in range(P):
                if l != k:
                    glob = glob + torch.clamp(S[l, k] - S[k, k] + global_margin, min=0)
                    glob = glob + torch.clamp(S[k, l] - S[k, k] + global_margin, min=0)
        glob = global_scale * glob
    return frag + glob, {"fragment": frag, "global": glob}
