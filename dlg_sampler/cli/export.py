"""``dlg-export``: a finished ``dlg-sample --out-dir`` run as FID tools read it: numbered PNGs or one ``.npz``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..shards import NPZ, manifests, run_progress, write_npz, write_pngs
from .common import HelpFormatter, check_writable, output_format


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dlg-export",
        description="Convert a finished dlg-sample --out-dir run into what FID tools read (pytorch-fid, clean-fid, "
                    "torch-fidelity: a folder of images; the ADM evaluation suite: an .npz with arr_0 uint8 "
                    "[N, H, W, C]). Images are round((x + 1) * 127.5) of the samples clamped to [-1, 1], one channel "
                    "repeated to three.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("dir", metavar="DIR", help="the --out-dir of a finished dlg-sample run")
    p.add_argument("--format", required=True, type=output_format("png", "npz"), metavar="{png,npz}",
                   help="numbered PNGs (000000.png ..., the run's order) or one .npz (arr_0 uint8 [N, H, W, 3])")
    p.add_argument("--out", default=None, help=f"png: the folder (default DIR itself); npz: the file (default "
                                               f"DIR/{NPZ})")
    return p


def export_main(argv: list[str] | None = None) -> None:
    parser = export_parser()
    args = parser.parse_args(argv)
    src = Path(args.dir)
    if not src.is_dir():
        parser.error(f"{src} is not a folder: pass the --out-dir of a dlg-sample run")
    try:
        config = manifests(src)[0]["config"]
        done, n = run_progress(src)
    except (ValueError, KeyError) as err:
        parser.error(f"{src} is not a dlg-sample --out-dir ({err}): pass the --out-dir of a dlg-sample run")
    if done < n:
        parser.error(f"{src} holds an unfinished run ({done} of {n} samples): rerun its dlg-sample command to finish "
                     "it, then export")
    if config.get("format") == "png" == args.format:
        parser.error(f"{src} is a --format png run: its PNGs are there already")
    if config.get("format", "safetensors") == "safetensors" and config.get("latents"):
        parser.error(f"{src} holds latents of a latent model, which need the model's VAE to become images: draw them "
                     "with dlg-sample --format png or npz, which decodes as it goes")
    out = Path(args.out) if args.out else src / NPZ if args.format == "npz" else src
    if args.format == "npz":
        if out.suffix != ".npz":
            parser.error(f"--out {out}: pass an .npz file path, e.g. {out.with_suffix('.npz')}")
        if out.exists():
            parser.error(f"--out {out} exists already: pass another --out, or delete it to write it again")
    check_writable(out, "--out", parser, folder=args.format == "png")
    try:
        if args.format == "npz":
            print(f"wrote {out}: arr_0 uint8 {list(write_npz(src, out))}")
        else:
            print(f"wrote {write_pngs(src, out)} PNGs to {out} (000000.png ...)")
    except ValueError as err:
        sys.exit(f"error: {err}")


main = export_main
