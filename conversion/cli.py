"""Command line: `python -m moe_mtp.conversion SRC DST ...` or `moe-mtp-convert SRC DST ...`.

Exit codes: 0 success, 2 bad input or usage (message on stderr, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import ConversionError, DestinationExistsError

EPILOG = """SRC is a local folder: download a hub model first (hub ids are not fetched).

examples:
  moe-mtp-convert path/to/DeepSeek-V3 path/to/v3-moe-mtp --dtype bf16            released FP8 -> moe_mtp bf16
  moe-mtp-convert path/to/v3-moe-mtp path/to/v3-fp8 --to deepseek --dtype fp8    back to the released FP8 layout
  moe-mtp-convert path/to/DeepSeek-V2-Lite path/to/v2-lite-hf --to transformers  transformers' stacked experts
  moe-mtp-convert SRC DST --dry-run                                              show what would be written
  moe-mtp-convert --inspect SRC                                                  parameter and dtype summary
"""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


def one_line(exc: BaseException) -> str:
    """The message on one line (a library's message may span several)."""
    return " ".join(str(exc).split())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moe-mtp-convert",
        description="Convert DeepSeek-V3/V2-style checkpoints (safetensors folders) between the released deepseek "
        "layout (FP8 or not, MTP as layer N+k), transformers' built-in classes and moe_mtp.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="local source checkpoint folder (config.json + safetensors)")
    parser.add_argument("dst", nargs="?", help="destination folder (written as DST.partial, then renamed)")
    parser.add_argument("--from", dest="src_format", default="auto",
                        choices=["auto", "deepseek", "transformers", "moe_mtp"],
                        help="source layout (default: detected from config.json and tensor names)")  # fmt: skip
    parser.add_argument("--to", dest="dst_format", default="moe_mtp", choices=["moe_mtp", "deepseek", "transformers"],
                        help="destination layout (default: moe_mtp)")  # fmt: skip
    parser.add_argument("--dtype", choices=["bf16", "fp32", "fp8"], default=None,
                        help="cast floating tensors; fp8 (with --to deepseek) quantizes as the release does. "
                        "Default: keep (FP8 stays FP8 only into deepseek)")  # fmt: skip
    parser.add_argument("--scale-fmt", choices=["inherit", "none", "ue8m0"], default="inherit",
                        help="FP8 scale format when writing FP8 (default: the source's)")  # fmt: skip
    parser.add_argument("--shard-size", default="5GB", help="maximum shard size, e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be written; write nothing")
    parser.add_argument("--force", action="store_true", help="replace an existing DST (once the new one is complete)")
    parser.add_argument("--allow-unknown", action="store_true", help="skip tensors the config does not account for")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--inspect", action="store_true", help="print a summary of SRC (from headers only) and exit")
    parser.add_argument("--json", action="store_true", help="with --inspect: print JSON")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    from . import convert, inspect
    from .summary import format_inspect

    try:
        if args.inspect:
            summary = inspect(args.src)
            print(json.dumps(summary, indent=2) if args.json else format_inspect(summary))
            return 0
        if args.dst is None:
            parser.print_usage(sys.stderr)
            print(f"{parser.prog}: error: DST is required (unless --inspect)", file=sys.stderr)
            return 2
        summary = convert(
            args.src,
            args.dst,
            src_format=args.src_format,
            dst_format=args.dst_format,
            dtype=args.dtype,
            shard_size=args.shard_size,
            dry_run=args.dry_run,
            force=args.force,
            allow_unknown=args.allow_unknown,
            progress=not args.no_progress,
            scale_fmt=None if args.scale_fmt == "none" else args.scale_fmt,
        )
        if not args.dry_run:
            print(f"wrote {summary['num_tensors']} tensors ({summary['total_bytes'] / 1e9:.3f} GB) to {args.dst}")
        return 0
    except DestinationExistsError as exc:
        print(f"error: {one_line(DestinationExistsError(exc.dst, hint='--force'))}", file=sys.stderr)
        return 2
    except (ConversionError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
