"""A slow, literal transcription of spec §2 that the sampler's exactness tests compare against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def spec_reference(model, prompt, n_new, steps, alg, temperature=0.0, top_p=None, top_k=None, alg_temp=None,
                   eps=1e-3):
    """A slow, literal transcription of spec §2 (global RNG, torch.distributions for token draws)."""
    mask_id = model.config.mask_token_id
    x = torch.cat([prompt, torch.full((prompt.shape[0], n_new), mask_id)], dim=1)
    ts = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask = x == mask_id
        with torch.no_grad():
            raw = model(x)
        logits = torch.cat([raw[:, :1], raw[:, :-1]], dim=1)
        t, s = ts[i], ts[i + 1]
        ml = logits[mask]

        def choose(lg):
            if temperature > 0:
                lg = lg / temperature
            if top_p is not None and top_p < 1:
                srt, idx = torch.sort(lg, descending=True)
                cum = torch.cumsum(F.softmax(srt, -1), -1)
                rm = cum > top_p
                rm[..., 1:] = rm[..., :-1].clone()
                rm[..., 0] = False
                lg = lg.masked_fill(torch.zeros_like(rm).scatter(-1, idx, rm), torch.finfo(lg.dtype).min)
            if top_k is not None:
                lg = lg.masked_fill(lg < torch.topk(lg, top_k)[0][..., -1:], torch.finfo(lg.dtype).min)
            p = torch.softmax(lg, -1)
            if temperature > 0:
                x0 = torch.distributions.Categorical(probs=p).sample()
                conf = p.gather(-1, x0[:, None])[:, 0]
            else:
                conf, x0 = p.max(-1)
            if alg == "topk_margin":
                sp = p.sort(-1, descending=True).values
                conf = sp[:, 0] - sp[:, 1]
            if alg == "entropy":
                conf = (p * torch.log(p + 1e-10)).sum(-1)
            return conf, x0

        if alg == "origin":
            pt = 1 - s / t if i < steps - 1 else 1
            x0 = torch.full((ml.shape[0],), mask_id)
            sel = torch.rand(x0.shape) < pt
            if sel.any():
                x0[sel] = choose(ml[sel])[1]
            x[mask] = x0
        else:
            conf, x0 = choose(ml)
            avg = mask.sum() / mask.shape[0]
            k = int(avg * (1 - s / t)) if i < steps - 1 else int(avg)
            full = torch.full(x.shape, -torch.inf)
            full[mask] = conf
            if k > 0:
                if not alg_temp:
                    idx = torch.topk(full, k).indices
                else:
                    idx = torch.multinomial(F.softmax(full / alg_temp, -1), k)
                prop = torch.full_like(x, mask_id)
                prop[mask] = x0
                for b in range(x.shape[0]):
                    x[b, idx[b]] = prop[b, idx[b]]
    return x


def counting_backend():
    """A torch.compile backend that runs the graph eagerly and records each graph's input shapes."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(tuple(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)))
        return gm.forward
    return backend, graphs
