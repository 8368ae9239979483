"""``python -m trainer.convert COMMAND ...`` (``nox -s convert -- COMMAND ...``).

    hf-to-mcore HF_DIR OUT_DIR [--layout L]        HF safetensors → megatron-core directory, unsharded (single)
                                                   or sharded for matrix layout L's TP/PP/EP/ETP (its ranks run)
    mcore-to-hf MCORE_DIR OUT_DIR --like HF_DIR    back to HF (unsharded or sharded), with HF_DIR's shard layout
    fsdp-to-hf CKPT_DIR OUT_DIR --like HF_DIR [--groupgemm]
                                                   an FSDP run's DCP checkpoint → HF safetensors
    verify HF_DIR MCORE_DIR [--tolerance T]        max |logit difference| on fixed tokens; exit 1 above T
                                                   (unsharded directories only)
    fp8-to-bf16 IN_DIR OUT_DIR [--block 128]       DeepSeek-V3 fp8 release → bf16 (resumable)
    prepare MODEL IN_DIR OUT_DIR                   the matrix model's prepare steps (OUT/hf, OUT/mcore); the steps
                                                   are trainer.prepare's (`nox -s prepare -- RECIPE` plans a recipe)
    drop-config-key DIR KEY                        a matrix prepare step on config.json
    set-config DIR KEY=VALUE ...                   a matrix prepare step on config.json (JSON values)

Bad input is one line on stderr and exit code 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from trainer.convert import ConvertError
from trainer.models.weight_files import WeightsError
from trainer.parallel.launcher import Placement, add_launcher_options, missing_package


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage block too)
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _placement_options(a: argparse.ArgumentParser) -> None:
    """Where a sharded conversion's ranks run (as `python -m trainer`'s options)."""
    add_launcher_options(a, ranks="the layout's ranks", default="local")
    a.add_argument("--ranks-per-node", type=int, default=None,
                   help="with --launcher ray: ranks on each node (default: all on one)")


def _placement(args: argparse.Namespace) -> Placement:
    lacking = missing_package(args.launcher)
    if lacking:
        raise ConvertError(lacking)
    if args.ranks_per_node is not None and args.ranks_per_node < 1:
        raise ConvertError(f"--ranks-per-node {args.ranks_per_node}: give a positive number of ranks")
    return Placement(args.launcher, args.ray_address, args.ranks_per_node)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="trainer.convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors → megatron-core")
    a.add_argument("hf_dir", type=Path)
    a.add_argument("out_dir", type=Path)
    a.add_argument("--layout", default="single",
                   help="a matrix layout: files per TP/PP/EP/ETP shard, read back by the trainer's ranks of that layout "
                        "('single': one unsharded state; FSDP layouts load HF checkpoints and are refused)")
    _placement_options(a)
    a = sub.add_parser("mcore-to-hf", help="megatron-core → HF safetensors")
    a.add_argument("mcore_dir", type=Path)
    a.add_argument("out_dir", type=Path)
    a.add_argument("--like", type=Path, required=True, help="the HF checkpoint whose shard layout and files to use")
    _placement_options(a)
    a = sub.add_parser("fsdp-to-hf", help="FSDP training checkpoint (torch distributed checkpoint) → HF safetensors")
    a.add_argument("ckpt_dir", type=Path, help="RUN/checkpoints/episode-N, or a run directory (its latest)")
    a.add_argument("out_dir", type=Path)
    a.add_argument("--like", type=Path, required=True, help="the HF checkpoint whose shard layout and files to use")
    a.add_argument("--groupgemm", action="store_true",
                   help="split grouped-GEMM expert tensors (mlp.experts.gate_up_proj / down_proj) per expert")
    a = sub.add_parser("verify", help="transformers vs megatron-core logits on fixed tokens")
    a.add_argument("hf_dir", type=Path)
    a.add_argument("mcore_dir", type=Path)
    a.add_argument("--tolerance", type=float, default=None)
    a = sub.add_parser("fp8-to-bf16", help="DeepSeek-V3 fp8 checkpoint → bf16")
    a.add_argument("in_dir", type=Path)
    a.add_argument("out_dir", type=Path)
    a.add_argument("--block", type=int, default=None, help="scale block size (default: from config.json, 128)")
    a = sub.add_parser("prepare", help="run a matrix model's prepare steps")
    a.add_argument("model", help="a model of matrix.yaml")
    a.add_argument("in_dir", type=Path)
    a.add_argument("out_dir", type=Path)
    a = sub.add_parser("drop-config-key", help="remove a key from config.json")
    a.add_argument("dir", type=Path)
    a.add_argument("key")
    a = sub.add_parser("set-config", help="set keys of config.json")
    a.add_argument("dir", type=Path)
    a.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    return p


def run(args: argparse.Namespace) -> int:
    if args.command == "hf-to-mcore":
        from trainer.convert.sharded import write_sharded

        print(f"wrote {write_sharded(args.hf_dir, args.out_dir, args.layout, _placement(args))}")
    elif args.command == "mcore-to-hf":
        from trainer.convert.sharded import mcore_to_hf_either

        print(f"wrote {mcore_to_hf_either(args.mcore_dir, args.out_dir, args.like, _placement(args))}")
    elif args.command == "fsdp-to-hf":
        from trainer.convert.fsdp_hf import fsdp_to_hf

        print(f"wrote {fsdp_to_hf(args.ckpt_dir, args.out_dir, args.like, groupgemm=args.groupgemm)}")
    elif args.command == "verify":
        from trainer.convert.verify import DEFAULT_TOLERANCE, max_logit_difference

        tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
        diff = max_logit_difference(args.hf_dir, args.mcore_dir)
        ok = diff <= tolerance
        print(f"max |logit difference| {diff:.3e} (tolerance {tolerance:g}): {'ok' if ok else 'FAILED'}")
        return 0 if ok else 1
    elif args.command == "fp8-to-bf16":
        from trainer.convert.fp8 import fp8_to_bf16

        print(f"wrote {fp8_to_bf16(args.in_dir, args.out_dir, block=args.block)}")
    elif args.command == "prepare":
        from matrix import load_matrix
        from trainer.prepare import PrepareError
        from trainer.prepare.steps import prepare_model_dir

        models = load_matrix().models
        if args.model not in models:
            raise ConvertError(f"prepare: {args.model!r} is not a matrix model ({', '.join(models)})")
        try:
            done = prepare_model_dir(list(models[args.model].prepare), args.in_dir, args.out_dir)
        except PrepareError as e:
            raise ConvertError(str(e)) from None
        for line in done:
            print(line)
    elif args.command == "drop-config-key":
        from trainer.convert.config_steps import drop_config_key

        dropped = drop_config_key(args.dir, args.key)
        print(f"{args.dir / 'config.json'}: {'dropped' if dropped else 'had no'} {args.key!r}")
    elif args.command == "set-config":
        from trainer.convert.config_steps import set_config

        print(f"{args.dir / 'config.json'}: set {', '.join(set_config(args.dir, args.assignments))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # megatron-core warns at import that TE/apex are absent: expected on CPU, and noise in every run
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    try:
        return run(args)
    except WeightsError as e:  # ConvertError too
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
