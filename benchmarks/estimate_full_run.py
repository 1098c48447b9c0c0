"""What a full paper-scale run costs: floating-point operations counted per stage, and the time on
an accelerator at a given sustained throughput.

    python benchmarks/estimate_full_run.py                      # gta5 preset, DeepLabV2-ResNet101
    python benchmarks/estimate_full_run.py --cpu-seconds-per-iteration source=180 round=250

The operations are counted, not guessed: ``torch.utils.flop_counter.FlopCounterMode`` traces one
forward (and backward) pass of the model on the ``meta`` device (no memory, no compute), at the
preset's sizes. A stage's count is its per-iteration count times its iterations:

- source-only: student forward + backward on ``batch`` source crops;
- warm-up (adversarial): the same on source crops, plus forward + backward on target crops (the
  discriminator's share is counted too and is below 1 %);
- a self-training round: EMA teacher forward on the weak view, student forward + backward on the
  strong view (HIAST's own kernels — selection, paste, views, fused loss — are memory-bound and
  not counted; the benchmarks time them);
- pseudo-labels: one forward per target image at the pseudo-label size, per round;
- evaluation: one forward per validation image at the evaluation size, after every stage.

Time = operations / sustained throughput. Sustained throughput is the one number to supply:
``--tflops`` values (default 50, 100, 200 TFLOP/s: roughly fp32/TF32 to bf16 on one current
data-centre GPU for dilated ResNet convolutions, well below the datasheet peaks). With
``--cpu-seconds-per-iteration`` (from a dry run's ``cost`` records) it also prints the throughput
those seconds imply, a check of the counting against a measurement.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from uda_selftrain.models import FCDiscriminator, deeplabv2_resnet101, deeplabv2_small


def count(fn) -> float:
    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    return float(mode.get_total_flops())


def per_iteration(args: argparse.Namespace) -> dict[str, float]:
    """FLOPs of one iteration (one batch) of each training stage and one image of inference."""
    with torch.device("meta"):
        if args.model == "resnet101":
            model = deeplabv2_resnet101(args.classes)
        else:
            model = deeplabv2_small(args.classes, width=args.width)
        disc = FCDiscriminator(args.classes)
    b = args.batch
    crop = torch.empty(b, 3, *args.crop, device="meta")

    def train_step():
        model(crop).sum().backward()

    def infer(size, batch=1):
        def run():
            with torch.no_grad():
                model(torch.empty(batch, 3, *size, device="meta"))

        return run

    def disc_step():
        disc(torch.empty(b, args.classes, *args.crop, device="meta")).sum().backward()

    step = count(train_step)
    teacher = count(infer(tuple(args.crop), batch=b))
    d = count(disc_step)
    return {
        "source": step,
        "warmup": 2 * step + 2 * d,
        "round": step + teacher,
        "pseudo_label": count(infer(args.pl_size)),
        "evaluate": count(infer(args.eval_size)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=["resnet101", "small"], default="resnet101")
    p.add_argument("--width", type=int, default=24, help="width of the small model")
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--crop", type=int, nargs=2, default=[512, 1024])
    p.add_argument("--pl-size", type=int, nargs=2, default=[768, 1536])
    p.add_argument("--eval-size", type=int, nargs=2, default=[768, 1536])
    p.add_argument("--source-iters", type=int, default=40000)
    p.add_argument("--warmup-iters", type=int, default=20000)
    p.add_argument("--round-iters", type=int, default=8000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--target-images", type=int, default=2975)
    p.add_argument("--val-images", type=int, default=500)
    p.add_argument("--tflops", type=float, nargs="+", default=[50.0, 100.0, 200.0])
    p.add_argument(
        "--cpu-seconds-per-iteration",
        nargs="*",
        default=[],
        metavar="STAGE=SECONDS",
        help="measured seconds per iteration (source, warmup, round) to check the counts against",
    )
    args = p.parse_args(argv)
    it = per_iteration(args)
    stages = {
        "source-only": (it["source"], args.source_iters),
        "warm-up": (it["warmup"], args.warmup_iters),
        "self-training rounds": (it["round"], args.round_iters * args.rounds),
        "pseudo-labels": (it["pseudo_label"], args.target_images * args.rounds),
        "evaluation (after each stage)": (it["evaluate"], args.val_images * (2 + args.rounds)),
    }
    print(
        f"{args.model}, {args.classes} classes, batch {args.batch}, crop {args.crop[0]}x{args.crop[1]}, "
        f"pseudo-labels {args.pl_size[0]}x{args.pl_size[1]}, evaluation {args.eval_size[0]}x{args.eval_size[1]}"
    )
    head = "| stage | GFLOP per iteration (or image) | iterations (or images) | PFLOP |"
    head += "".join(f" h at {t:g} TFLOP/s |" for t in args.tflops)
    print(head)
    print("|---|---|---|---|" + "---|" * len(args.tflops))
    total = 0.0
    for name, (flops, n) in stages.items():
        total += flops * n
        hours = "".join(f" {flops * n / (t * 1e12) / 3600:.2f} |" for t in args.tflops)
        print(f"| {name} | {flops / 1e9:.6g} | {n} | {flops * n / 1e15:.4g} |{hours}")
    hours = "".join(f" **{total / (t * 1e12) / 3600:.1f}** |" for t in args.tflops)
    print(f"| **total** | | | **{total / 1e15:.4g}** |{hours}")
    for item in args.cpu_seconds_per_iteration:
        stage, _, seconds = item.partition("=")
        key = {"source": "source", "warmup": "warmup", "round": "round"}.get(stage)
        if key is None or not seconds:
            raise SystemExit(
                f"--cpu-seconds-per-iteration: expected source|warmup|round=SECONDS, got {item!r}"
            )
        rate = it[key] / float(seconds) / 1e9
        print(f"measured {stage}: {float(seconds):.1f} s/iteration -> {rate:.0f} GFLOP/s sustained")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
