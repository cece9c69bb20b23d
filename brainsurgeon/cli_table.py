"""`brainsurgeon table`: the README tables (and plots) of bench JSON files."""
import json

from . import bench, bench_structured, bench_structured_vision, validation
from .errors import BrainSurgeonError, first_line


def table_command(args):
    reports = []
    for name in args.json_files:
        path = validation.input_file(name, "bench JSON", validation.MAX_TEXT_BYTES)
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError) as error:
            raise BrainSurgeonError(f"cannot read bench JSON {path}: {first_line(error)}") from None
    vision = [bench_structured_vision.is_vision_structured(report) for report in reports]
    if any(vision):
        if not all(vision):
            raise BrainSurgeonError("channel sweeps (bench --pattern channels) make a table only with other channel "
                                    "sweeps; pass those alone")
        if args.plot:
            bench_structured_vision.plot(reports, args.plot, overwrite=args.overwrite)
        print(bench_structured_vision.markdown_table(reports))
        return
    structured = [bench_structured.is_structured(report) for report in reports]
    if len(reports) > 1 and not all(structured):
        if any(structured) or any(report.get("metric") != "perplexity" for report in reports):
            raise BrainSurgeonError("several bench JSONs make one table only for structured sweeps (bench --pattern) "
                                    "or for language-model sweeps (bench --hf-model) of one model; pass one JSON")
        reports = [bench.merged(reports)]
    if args.plot and not all(structured):
        raise BrainSurgeonError("table --plot draws structured sweeps (bench --pattern); bench --plot draws the others")
    try:
        table = bench_structured.markdown_table(reports) if all(structured) else bench.markdown_table(reports[0])
    except (KeyError, TypeError, IndexError, AttributeError) as error:
        raise BrainSurgeonError(f"{args.json_files[0]} is not a bench JSON written by 'brainsurgeon bench' "
                                f"({type(error).__name__}: {first_line(error)}); pass one that is") from None
    if args.plot:
        bench_structured.plot(reports, args.plot, overwrite=args.overwrite)
    print(table)
