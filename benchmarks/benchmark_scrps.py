#!/usr/bin/env python
"""SCRPS ablations in one run, on one cohort (default: the synthetic demo cohort), with the
shipped weights and latent repository:

* partial swap at L2 in {0, 6, 9, 11} with coarse-to-fine retrieval (L2 = 0: the retrieved code
  alone, no swap; the paper's best is 9). With the demo weights (64 x 64, W+ of L = 10 layers)
  the layers are counted from the finest end (the swap must replace the same full-resolution
  block): the paper's 6 / 9 / 11 are 4 / 7 / 9 there;
* one-stage retrieval (cosine on all layers, top K2) against coarse-to-fine, both at the paper's L2 = 9;
* optionally (`--residual`) the plain residual |x - G| as the map instead of the perceptual score A_per;
* W+ inversion time per volume: all brain slices at once (one Adam over a (B, L, 512) tensor)
  against the per-slice loop (measured on `--loop-slices` slices and scaled to the volume).

    python benchmarks/benchmark_scrps.py [--datalist demo] [--device cpu] [--max-volumes N]
        [--l2 0 6 9 11] [--residual] [--loop-slices 8] [--jobs 1] [--output-dir outputs/benchmark_scrps]

Each ablation row is one `run_bundle("scrps", "evaluate", overrides)` in its own process; the
numbers come from its metrics.json (pooled [Dice], pixel AP, volume AUROC). The rows share an
inversion cache (`inversion_cache`), so every slice is inverted once: the first row pays the
inversion, the others only retrieval, generation and scoring (their seconds per volume say so).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from medanomaly.benchmark import format_table
from medanomaly.bundles import bundle_scripts, find_bundle, run_bundle
from medanomaly.data import load_datalist, resolve_datalist
from medanomaly.data.datalist import TEST_KEYS, first_test_volumes

COLUMNS = ("row", "l2", "retrieval", "score", "pooled_dice", "pixel_ap", "volume_auroc", "seconds_per_volume")


PAPER_NUM_WS = 12


def layer(paper_l2: int, num_ws: int) -> int:
    """The paper's swap layer (of L = 12) for a generator with `num_ws` layers, counted from the
    finest end (0 stays 0: no swap). At 64 x 64 (L = 10) the paper's 6 / 9 / 11 are 4 / 7 / 9."""
    return 0 if paper_l2 == 0 else max(0, min(num_ws, paper_l2 - (PAPER_NUM_WS - num_ws)))


def demo_weights() -> bool:
    return find_bundle("scrps").weights_need_demo_config


def inversion_timing(datalist: Path, device: str | None, loop_slices: int, batch_size: int) -> dict:
    """Seconds to invert the brain slices of the first test volume: batched (in chunks of
    `batch_size`, as inference does) and one slice at a time (on `loop_slices` slices, scaled)."""
    from monai.bundle import ConfigParser

    from medanomaly.data import preprocessing

    bundle = find_bundle("scrps")
    parser = ConfigParser()
    parser.read_config([str(bundle.config_file(n)) for n in ["inference", *(["demo"] if demo_weights() else [])]])
    parser.update({"device": device or ("cuda" if torch.cuda.is_available() else "cpu")})
    with bundle_scripts("scrps") as scripts:
        inverter, generator = parser.get_parsed_content("inverter"), parser.get_parsed_content("network")
        item = load_datalist(datalist, "test_lesion")[0]
        volume = preprocessing(image_size=parser.get_parsed_content("image_size"))(item)
        image, mask = (volume[k][0].permute(2, 0, 1)[:, None].as_tensor() for k in ("image", "mask"))
        slices = scripts.resize(image[mask.flatten(1).any(1)], generator.size).to(parser.get_parsed_content("device"))

        def timed(fn):
            if slices.is_cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            fn()
            if slices.is_cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - started

        batched = timed(lambda: [inverter.invert(slices[i:i + batch_size]) for i in range(0, len(slices), batch_size)])
        n_loop = min(loop_slices, len(slices))
        loop = timed(lambda: inverter.invert_per_slice(slices[:n_loop]))
    per_volume_loop = loop / n_loop * len(slices)
    return {"subject": item.get("subject"), "brain_slices": len(slices), "steps": inverter.steps,
            "device": str(slices.device), "batched_seconds_per_volume": round(batched, 2),
            "per_slice_seconds_per_volume": round(per_volume_loop, 2), "per_slice_measured_on": n_loop,
            "speed_up": round(per_volume_loop / batched, 1)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", default="demo", help="Decathlon-style JSON or a synthetic preset (default: demo)")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    parser.add_argument("--l2", nargs="+", type=int, default=[0, 6, 9, 11], help="swap layers to compare")
    parser.add_argument("--max-volumes", type=int, help="evaluate on the first N test volumes only")
    parser.add_argument("--loop-slices", type=int, default=8, help="slices the per-slice inversion loop is timed on")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--residual", action="store_true", help="add a row scoring |x - G| instead of A_per")
    parser.add_argument("--jobs", type=int, default=1,
                        help="rows after the first evaluated at once (they read the cache)")
    parser.add_argument("--output-dir", default="outputs/benchmark_scrps")
    parser.add_argument("--n-bootstrap", type=int, default=200)
    args = parser.parse_args(argv)

    output_dir = Path(args.output_dir).resolve()
    datalist = resolve_datalist(args.datalist)
    if args.max_volumes:
        datalist, _ = first_test_volumes(datalist, args.max_volumes, output_dir / f"first_{args.max_volumes}")
    n_volumes = sum(len(load_datalist(datalist, key)) for key in TEST_KEYS)
    num_ws = find_bundle("scrps").model_info.get("num_ws", PAPER_NUM_WS)
    default = layer(9, num_ws)
    settings = ([(layer(l2, num_ws), True, "perceptual") for l2 in args.l2] + [(default, False, "perceptual")]
                + ([(default, True, "residual")] if args.residual else []))
    def evaluate(setting) -> dict:
        l2, coarse_to_fine, score = setting
        name = f"l2={l2}" + ("" if coarse_to_fine else " one-stage") + ("" if score == "perceptual" else f" {score}")
        out = output_dir / name.replace(" ", "_").replace("=", "")
        overrides = {"datalist": str(datalist), "output_dir": str(out), "n_bootstrap": args.n_bootstrap,
                     "device": args.device, "save_outputs": False, "l2": l2, "coarse_to_fine": coarse_to_fine,
                     "score": score,
                     "inversion_cache": str(output_dir / "inversion_cache")}
        print(f"== {name}: evaluating {n_volumes} test volumes ...", flush=True)
        run_bundle("scrps", "evaluate", overrides)
        metrics = json.loads((out / "metrics.json").read_text())
        return {"row": name, "l2": l2, "retrieval": "coarse-to-fine" if coarse_to_fine else "one-stage", "score": score,
                "pooled_dice": metrics["pixel"]["max_dice"]["dice"], "pixel_ap": metrics["pixel"]["ap"],
                "volume_auroc": metrics["volume"].get("auroc"),
                "seconds_per_volume": metrics["timing"]["seconds_per_volume"]}

    settings = list(dict.fromkeys(settings))
    rows = [evaluate(settings[0])]  # inverts every slice once (or finds the codes in the cache)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # the others read the cache
        rows += list(pool.map(evaluate, settings[1:]))
    print(f"\nscrps on {n_volumes} test volumes of {args.datalist} (W+ of {num_ws} layers"
          + (", demo weights" if demo_weights() else "") + "):")
    print(format_table(rows, COLUMNS))
    print("The first row inverted every slice; the others read the inversion cache (their seconds exclude inversion).")
    if num_ws != PAPER_NUM_WS:
        print(f"L = {num_ws}: the paper's L2 = {', '.join(map(str, args.l2))} (of 12) are counted from the finest "
              f"layer: L2 = {', '.join(str(layer(l2, num_ws)) for l2 in args.l2)} here.")
    by_l2 = {r["l2"]: r for r in rows if r["retrieval"] == "coarse-to-fine" and r["score"] == "perceptual"}
    best = default
    if 0 in by_l2 and best in by_l2:
        swap, none = by_l2[best], by_l2[0]
        better = [k for k in ("pooled_dice", "pixel_ap", "volume_auroc") if (swap[k] or 0) > (none[k] or 0)]
        print(f"Partial swap (L2 = {best}, the paper's 9) vs no swap (L2 = 0): " + ", ".join(
            f"{k} {swap[k] - none[k]:+.3f}" for k in ("pooled_dice", "pixel_ap", "volume_auroc")
            if swap[k] is not None and none[k] is not None)
              + f" -> the swap {'beats' if len(better) >= 2 else 'does not beat'} no swap here "
              f"(paper: about +4 AUROC points).")
    timing = None
    if not args.skip_timing:
        timing = inversion_timing(datalist, args.device, args.loop_slices, batch_size=64)
        print(f"\nW+ inversion of one volume ({timing['brain_slices']} brain slices, {timing['steps']} steps, "
              f"{timing['device']}): batched {timing['batched_seconds_per_volume']:.1f} s, per-slice loop "
              f"{timing['per_slice_seconds_per_volume']:.1f} s (timed on {timing['per_slice_measured_on']} slices, "
              f"scaled) -> {timing['speed_up']} x faster batched.")
    output_dir.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "inversion_timing": timing, "datalist": str(datalist), "num_ws": num_ws}
    (output_dir / "benchmark_scrps.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
