"""IAS threshold update + selection + statistics: ours vs the reference approach.

The reference (public IAST/HIAST pseudo-label step, re-created faithfully): confidences and
predictions copied to the host; per class a Python list of float16 confidences (the previous
threshold as an extra sample) and ``np.quantile``; the per-pixel threshold map built with
``np.apply_along_axis`` and a Python lambda per row; per-class pixel counts with builtin
``sum(sum(mask))``; class mean confidences. PNG writing is left out of both sides.

Softmax is excluded from both sides (the inputs are probabilities). Two timings are printed:
``update``: from (confidence, prediction), one per-batch update — the IAS work itself, the
issue's target; ``per image``: the same with one update per image in batch order (the library's
default granularity; the reference approach called once per image); and ``end-to-end``: from
probabilities, including max/arg-max over classes on both sides.

``--scale`` multiplies the random logits: 4 (default) gives spread confidences; 20 gives the
saturated ones of a trained network (most pixels within 1e-6 of 1, many exactly 1.0), the worst
case for histogram bins and counters that every pixel hits.

Usage: python benchmarks/bench_selection.py [--size 2 19 768 1536] [--device cpu|cuda] [--repeat 3]
       [--scale 4]
"""

from __future__ import annotations

import resource

import numpy as np
import torch
from _common import base_parser, machine, sync, timeit

from uda_selftrain import InstanceAdaptiveSelector, set_value_checks


def reference_update(conf_t, pred_t, cls_thresh, v, seen, alpha, beta, gamma):
    """One per-batch IAS step the way the public implementation does it, on the host."""
    conf = conf_t.cpu().numpy()
    pred = pred_t.cpu().numpy()
    num_classes = cls_thresh.shape[0]
    conf_dict = {c: [cls_thresh[c]] for c in range(num_classes)}
    for c in range(num_classes):
        idx = pred == c
        if idx.any():
            conf_dict[c].extend(conf[idx].astype(np.float16))
    new = np.ones(num_classes, dtype=np.float32)
    for c in range(num_classes):
        arr = np.array(conf_dict[c])
        new[c] = np.quantile(arr, 1 - alpha * cls_thresh[c] ** gamma)
    cls_thresh = beta * cls_thresh + (1 - beta) * new
    cls_thresh[cls_thresh >= 1] = 0.999
    labels = pred.copy()
    for i in range(pred.shape[0]):
        th_map = np.apply_along_axis(lambda x: [cls_thresh[e] for e in x], 1, pred[i])
        labels[i][conf[i] < th_map] = 255
    counts = np.zeros((pred.shape[0], num_classes), dtype=np.int64)
    for i in range(pred.shape[0]):
        for c in range(num_classes):
            counts[i, c] = sum(sum(labels[i] == c))
    for c in range(num_classes):
        m = labels == c
        if m.any():
            mean = conf[m].mean()
            v[c] = 0.99 * v[c] + 0.01 * mean if seen[c] else mean
            seen[c] = True
    return cls_thresh, labels, counts


def main() -> None:
    parser = base_parser(__doc__, [2, 19, 768, 1536])
    parser.add_argument("--scale", type=float, default=4.0, help="logit scale (default 4)")
    args = parser.parse_args()
    device = torch.device(args.device)
    n, c, h, w = args.size
    gen = torch.Generator().manual_seed(0)
    # Peaked, realistic probabilities (most pixels confident, some not).
    logits = torch.randn(n, c, h, w, generator=gen) * args.scale
    probs = logits.softmax(1).to(device)
    del logits
    conf, pred = probs.max(1)
    alpha, beta, gamma = 0.5, 0.9, 8.0
    print(f"machine: {machine()}")
    selector_check = InstanceAdaptiveSelector(c).to(device)
    selector_check(probs[:1], probabilities=True)  # validates the inputs once (NaN/Inf, range)
    print(
        f"inputs: probabilities {tuple(probs.shape)} float32 on {device}, logit scale {args.scale}, "
        f"{(conf == 1).float().mean().item():.0%} of confidences exactly 1"
    )

    def ours(granularity):
        sel = InstanceAdaptiveSelector(
            c, alpha=alpha, beta=beta, gamma=gamma, granularity=granularity
        ).to(device)

        def run():
            sel.reset()
            sel.select_from_confidence(conf, pred)
            return sel.thresholds

        return sel, run

    selector, ours_update = ours("batch")
    _, ours_per_image = ours("image")

    def reference(images, from_probabilities=False):
        def run():
            cf, pr = probs.max(1) if from_probabilities else (conf, pred)
            th, v, seen = np.full(c, 0.9, np.float32), np.zeros(c), np.zeros(c, bool)
            for i in images:
                th = reference_update(cf[i], pr[i], th, v, seen, alpha, beta, gamma)[0]
            return th

        return run

    ref_update = reference([slice(0, n)])
    ref_per_image = reference([slice(i, i + 1) for i in range(n)])

    def ours_e2e():
        selector.reset()
        return selector(probs, probabilities=True)

    ref_e2e = reference([slice(0, n)], from_probabilities=True)

    # Same answer first (thresholds within the reference's float16 rounding).
    # Inputs were validated once above; a training loop would also run without per-call value checks.
    set_value_checks(False)
    th_ours = ours_update().cpu().numpy()
    th_ref = ref_update()
    print(f"max |θ_ours − θ_ref| = {np.abs(th_ours - th_ref).max():.2e}")

    def report(name, ours_fn, ref_fn):
        t_ours = timeit(ours_fn, device, args.repeat)
        t_ref = timeit(ref_fn, device, max(1, args.repeat // 2), warmup=0)
        print(
            f"{name:11s} ours {t_ours * 1e3:9.2f} ms   reference {t_ref * 1e3:9.2f} ms   "
            f"ratio {t_ref / t_ours:7.1f}x"
        )
        return t_ours

    report("update", ours_update, ref_update)
    if device.type == "cpu":
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            ours_update()
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
        print(
            f"ours: {faults:.0f} minor page faults per update (fresh temporaries fault every page)"
        )
    report("per image", ours_per_image, ref_per_image)
    t_ours2 = report("end-to-end", ours_e2e, ref_e2e)
    if device.type == "cuda":
        # Roofline: the time to read the probabilities once.
        buf = torch.empty_like(probs)
        t_read = timeit(lambda: buf.copy_(probs), device, 10) / 2  # copy = read + write
        sync(device)
        print(
            f"GPU: read-once time {t_read * 1e3:.3f} ms; end-to-end / read-once = {t_ours2 / t_read:.2f}x"
        )
        torch.cuda.reset_peak_memory_stats()
        ours_e2e()
        print(
            f"GPU peak memory (ours, end-to-end): {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()
