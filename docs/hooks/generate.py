"""MkDocs hook: the pages that must never be typed by hand, generated at build time.

- reference/cli.md          every command and option, from fraudstream.cli.build_parser()
- reference/environment.md  every environment variable, from fraudstream.settings (ENV, defaults, comments)
- reference/rules-file.md   the rule kinds, their defaults and bounds (consumer/rules.py) and rules/default.toml
- reference/schemas.md      the record schemas, from schemas/*.avsc and schemas/history/
- reference/metrics.md      the detector's Prometheus metrics, from consumer/metrics.py
- benchmarks/results.md     benchmarks/results/latest.md, state.md, handbook-model.json, engine_before_after.json
                            and the charts

Pages are added to the build as generated files (nothing is written into docs/). Everything here reads
local files and imports the project: a build fetches nothing.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.generate")  # mkdocs counts its warnings: --strict fails on them
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
CHARTS = ("latest-throughput.png", "latest-cpu.png", "latest-latency-cdf.png", "latest-scale.png")
# The hand-written readings of a benchmark run name the commit they were written for, in this marker.
READINGS_MARKER = re.compile(r"<!-- readings of the run at commit `?([0-9a-f]{7,40})`? -->")

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


def md(text: str) -> str:
    """Plain text as Markdown that shows it as it is, in a table cell too."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def code(text: str) -> str:
    text = str(text).replace("|", "\\|")
    return f"``{text}``" if "`" in text else f"`{text}`"


def shown_path(value: Path) -> str:
    try:
        return str(value.resolve().relative_to(ROOT))
    except ValueError:
        return str(value)


# --------------------------------------------------------------------------------------------- the CLI


def _parsers(parser: argparse.ArgumentParser, path: list[str]):
    """(command path, parser) for the parser and every subcommand under it, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + [name])


def _default(action: argparse.Action) -> str:
    default = action.default
    if default in (None, argparse.SUPPRESS, False, []) or isinstance(action, argparse._HelpAction):
        return ""
    if isinstance(default, Path):
        return code(shown_path(default))
    return code(default)


def _option(action: argparse.Action) -> str:
    if not action.option_strings:
        name = action.metavar or action.dest
        return code(name if not action.choices else "{" + ",".join(map(str, action.choices)) + "}")
    takes_value = action.nargs != 0
    metavar = ""
    if takes_value:
        metavar = action.metavar or (
            ("{" + ",".join(map(str, action.choices)) + "}") if action.choices else action.dest.upper()
        )
        metavar = " " + (" ".join(metavar) if isinstance(metavar, tuple) else metavar)
    return ", ".join(code(option + metavar) for option in action.option_strings)


def cli_page() -> str:
    from fraudstream.cli import build_parser

    parser = build_parser()
    lines = [
        "# Command line",
        "",
        "Generated from the argument parsers (`fraudstream.cli.build_parser`) when the site is built: "
        "this is what `fraudstream COMMAND -h` prints, as tables. Flags override the environment "
        "([Environment variables](environment.md)), which overrides the defaults.",
        "",
    ]
    for path, sub in _parsers(parser, ["fraudstream"]):
        title = " ".join(path)
        lines += [f"## {title}", ""]
        if sub.description and len(path) > 1:
            lines += [md(sub.description), ""]
        formatter = sub._get_formatter()
        lines += ["```text", sub.format_usage().strip(), "```", ""]
        for group in sub._action_groups:
            actions = [
                a
                for a in group._group_actions
                if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and a.help != argparse.SUPPRESS
            ]
            subcommands = [a for a in group._group_actions if isinstance(a, argparse._SubParsersAction)]
            for action in subcommands:
                lines += ["| Command | What |", "|---|---|"]
                for choice in action._choices_actions:
                    anchor = "-".join(path + [choice.dest]).lower()
                    lines.append(f"| [{code(' '.join(path + [choice.dest]))}](#{anchor}) | {md(choice.help or '')} |")
                lines.append("")
            if not actions:
                continue
            lines += [
                f"**{md(group.title)}**" if group.title else "",
                "",
                "| Option | Default | Description |",
                "|---|---|---|",
            ]
            for action in actions:
                help_text = formatter._expand_help(action) if action.help else ""
                lines.append(f"| {_option(action)} | {_default(action)} | {md(help_text)} |")
            lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- environment variables


def _field_comments(source: Path, class_name: str) -> dict[str, str]:
    """The comment lines just above each field of a dataclass, and its end-of-line comment."""
    text = source.read_text()
    lines = text.splitlines()
    comments: dict[str, str] = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    above = []
                    index = item.lineno - 2
                    while index >= 0 and lines[index].strip().startswith("#"):
                        above.insert(0, lines[index].strip().lstrip("#").strip())
                        index -= 1
                    line = lines[item.lineno - 1]
                    inline = line.split("  # ", 1)[1].strip() if "  # " in line else ""
                    comments[item.target.id] = " ".join(part for part in (" ".join(above), inline) if part)
    return comments


def _flags_by_dest() -> dict[str, dict[str, list[str]]]:
    """Setting name -> option string -> the commands that take it."""
    from fraudstream.cli import build_parser

    found: dict[str, dict[str, list[str]]] = {}
    for path, sub in _parsers(build_parser(), ["fraudstream"]):
        for action in sub._actions:
            for option in action.option_strings:
                if option.startswith("--"):
                    commands = found.setdefault(action.dest, {}).setdefault(option, [])
                    if len(path) > 1 and path[1] not in commands:  # `rules set`, `rules list`...: once, as rules
                        commands.append(path[1])
    return found


def _flag_help(dest: str) -> str:
    from fraudstream.cli import build_parser

    for _, sub in _parsers(build_parser(), ["fraudstream"]):
        for action in sub._actions:
            if action.dest == dest and action.help and action.help != argparse.SUPPRESS:
                return re.sub(r"\s*\[[A-Z_]+(, [^\]]*)?\]$", "", sub._get_formatter()._expand_help(action))
    return ""


def environment_page() -> str:
    from fraudstream import settings as settings_module
    from fraudstream.settings import ENV, Settings

    comments = _field_comments(Path(settings_module.__file__), "Settings")
    flags = _flags_by_dest()
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    lines = [
        "# Environment variables",
        "",
        "Generated from `fraudstream/settings.py` when the site is built: `ENV` names each variable, "
        "the `Settings` dataclass gives its default and the comment above the field says what it is for "
        "(or else the help of the flag that sets it). Order: the defaults, then the environment, then the "
        "client properties files, then `-X`/`-R`, then named flags.",
        "",
        "| Variable | Default | Flags | What |",
        "|---|---|---|---|",
    ]
    for name, variable in ENV.items():
        f = fields[name]
        default: Any = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, Path):
            shown = code(shown_path(default))
        elif default in (None, ""):
            shown = "none"
        else:
            shown = code(default)
        options = "<br>".join(
            f"{code(option)} ({', '.join(commands)})" for option, commands in flags.get(name, {}).items()
        )
        what = comments.get(name) or _flag_help(name)
        lines.append(f"| {code(variable)} | {shown} | {options} | {md(what)} |")
    lines += [
        "",
        "Derived from `FRAUDSTREAM_TOPIC` (`T`) and `FRAUDSTREAM_GROUP_ID` (`G`): the topics "
        "`T.legit`, `T.fraud`, `T.dlq`, `T.labels`, `T.rules` and the changelogs `G.T.<store>.changelog` "
        "([Topics and headers](topics.md)).",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- rules


def rules_file_page() -> str:
    from fraudstream.consumer.rules import DEFAULT_RULES, DEFAULT_RULES_FILE, PARAMETER_BOUNDS

    lines = [
        "# Rules file",
        "",
        "Generated from `consumer/rules.py` (`DEFAULT_RULES`, `PARAMETER_BOUNDS`) and `rules/default.toml` "
        "when the site is built. A rules file has one TOML table per rule id; `kind` names the predicate "
        "(default: the id), `enabled` defaults to true, and a missing key keeps its default. The same "
        "checks apply to `fraudstream detect --rules FILE`, `fraudstream rules set FILE` and every record "
        "on the rules topic ([Rules and runtime changes](../how-to/rules.md)).",
        "",
        "## Rule kinds and their defaults",
        "",
        "| Kind | Parameter | Default |",
        "|---|---|---|",
    ]
    for kind, parameters in DEFAULT_RULES.items():
        for index, (key, value) in enumerate(parameters.items()):
            lines.append(f"| {code(kind) if index == 0 else ''} | {code(key)} | {code(json.dumps(value))} |")
    lines += [
        "",
        "`large_amount`'s `threshold_cents`, when absent, is the detector's "
        "`FRAUDSTREAM_FRAUD_THRESHOLD_CENTS` setting.",
        "",
        "## Bounds of each parameter",
        "",
        "A value outside its bounds is refused with one line (the rules file, `rules set`) or dead-lettered "
        "as `invalid_rule` (the rules topic). Numbers must be finite.",
        "",
        "| Parameter | Type | Minimum | Maximum | Why that maximum |",
        "|---|---|---:|---:|---|",
    ]
    for key, bound in PARAMETER_BOUNDS.items():
        kind = bound.type.__name__
        minimum = "" if bound.minimum is None else code(bound.minimum)
        maximum = "" if bound.maximum is None else code(bound.maximum) + (" entries" if kind == "list" else "")
        lines.append(f"| {code(key)} | {kind} | {minimum} | {maximum} | {md(bound.why)} |")
    lines += [
        "",
        "## `rules/default.toml`",
        "",
        "The detector's defaults, with the reason for each threshold (a test keeps it equal to `DEFAULT_RULES`):",
        "",
        "```toml",
        Path(DEFAULT_RULES_FILE).read_text().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ schemas


def _type(avro: Any) -> str:
    if isinstance(avro, list):
        return " \\| ".join(_type(branch) for branch in avro)
    if isinstance(avro, dict):
        kind = avro.get("type")
        if kind == "enum":
            return f"enum {code(avro['name'])}: " + ", ".join(code(s) for s in avro["symbols"])
        if kind == "record":
            return f"record {code(avro['name'])} (below)"
        if kind == "array":
            return f"array of {_type(avro['items'])}"
        if kind == "map":
            return f"map of {_type(avro['values'])}"
        if "logicalType" in avro:
            return f"{code(kind)} ({avro['logicalType']})"
        return _type(kind)
    if isinstance(avro, str) and "." in avro:
        name = avro.rsplit(".", 1)[1]  # a named type of another schema file: link its section
        if name in _schema_names():
            return f"[{code(avro)}](#{name.lower()})"
    return code(avro)


def _schema_names() -> set[str]:
    return {json.loads(path.read_text())["name"] for path in (ROOT / "schemas").glob("*.avsc")}


def _records(schema: dict, found: list[dict]) -> list[dict]:
    """The record and every record nested in it, outermost first."""
    found.append(schema)

    def visit(avro: Any) -> None:
        if isinstance(avro, list):
            for branch in avro:
                visit(branch)
        elif isinstance(avro, dict):
            if avro.get("type") == "record":
                _records(avro, found)
            for key in ("items", "values"):
                if key in avro:
                    visit(avro[key])
            if isinstance(avro.get("type"), (dict, list)):
                visit(avro["type"])

    for f in schema.get("fields", []):
        visit(f["type"])
    return found


def schemas_page() -> str:
    schemas_dir = ROOT / "schemas"
    lines = [
        "# Record schemas",
        "",
        "Generated from `schemas/*.avsc`, the single source of truth, when the site is built "
        "(`fraudstream/records.py` mirrors them as typed dataclasses; a test keeps the two equal). Each "
        "subject is `<topic>-value`, compatibility `FULL_TRANSITIVE` ([Schemas and evolution]"
        "(../concepts/schemas.md)).",
        "",
    ]
    for path in sorted(schemas_dir.glob("*.avsc")):
        schema = json.loads(path.read_text())
        history = sorted((schemas_dir / "history" / path.stem).glob("v*.avsc"))
        lines += [
            f"## {schema['name']}",
            "",
            f"`schemas/{path.name}`, namespace `{schema.get('namespace', '')}`"
            + (
                f"; released versions kept in `schemas/history/{path.stem}/`: " + ", ".join(p.stem for p in history)
                if history
                else ""
            )
            + ".",
            "",
        ]
        if schema.get("doc"):
            lines += [md(schema["doc"]), ""]
        for record in _records(schema, []):
            if record is not schema:
                lines += [f"**{record['name']}** (nested)", ""]
            lines += ["| Field | Type | Default | Description |", "|---|---|---|---|"]
            for f in record["fields"]:
                default = code(json.dumps(f["default"])) if "default" in f else ""
                lines.append(f"| {code(f['name'])} | {_type(f['type'])} | {default} | {md(f.get('doc', ''))} |")
            lines.append("")
        lines += ['??? note "The schema as it is"', "", "    ```json"]
        lines += ["    " + line for line in path.read_text().rstrip().splitlines()]
        lines += ["    ```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ metrics


def metrics_page() -> str:
    from prometheus_client.metrics import MetricWrapperBase

    from fraudstream.consumer.metrics import DetectorMetrics

    metrics = DetectorMetrics()
    lines = [
        "# Metrics",
        "",
        "Generated from `consumer/metrics.py` when the site is built. `fraudstream detect --metrics-port N` "
        "(`FRAUDSTREAM_METRICS_PORT`) serves them on `:N/metrics` for Prometheus; every `--log-interval` "
        "seconds the detector also logs one line with the same totals.",
        "",
        "| Metric | Type | Labels | What |",
        "|---|---|---|---|",
    ]
    # The metric objects themselves: a labelled metric has no sample (so no label names) until it is used.
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            name = metric._name + ("_total" if metric._type == "counter" else "")
            labels = ", ".join(code(label) for label in metric._labelnames)
            lines.append(f"| {code(name)} | {metric._type} | {labels} | {md(metric._documentation)} |")
    lines += [
        "",
        "Labels of labelled metrics appear once a value is recorded: `route` "
        "(`legit`, `fraud`, `dead_letter`), `kind` (a dead-letter kind), `rule`, `store`.",
        "",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- benchmarks


def _demote(markdown: str) -> str:
    return re.sub(r"^(#+) ", r"#\1 ", markdown, flags=re.M)


def handbook_table() -> list[str]:
    report = json.loads((RESULTS / "handbook-model.json").read_text())
    overall = report["overall"]
    lines = [
        "## The detector on the Handbook's data",
        "",
        f"`benchmarks/results/handbook-model.json`, written by `make handbook` on {report['generated_at'][:10]}: "
        f"test week {report['window']['from']} to {report['window']['to']}, {overall['transactions']:,} "
        f"transactions evaluated ({report['known_compromised_left_out']:,} of cards already known compromised "
        f"left out), {overall['frauds']:,} frauds; at the model's threshold it flagged {overall['flagged']:,}, "
        f"{overall['caught']:,} of them fraud (precision {overall['precision']:.3f}, recall "
        f"{overall['recall']:.3f}).",
        "",
        "| Model | AUC ROC | Average Precision | Card Precision@100 |",
        "|---|---:|---:|---:|",
    ]
    for row in report["baselines"]:
        lines.append(
            f"| {md(row['model'])} | {row['auc_roc']:.3f} | {row['average_precision']:.3f} | "
            f"{row['card_precision']:.3f} |"
        )
    lines += ["", "![Precision-recall curve and CP@100 per day](handbook-model.png)", ""]
    return lines


def engine_table() -> list[str]:
    """The default detector before the engine redesign and now (make bench-engine, issue #21)."""
    report = json.loads((RESULTS / "engine_before_after.json").read_text())
    sides, ratios = report["sides"], report.get("ratios_after_before", {})
    lines = [
        "## The engine before and after its redesign: `make bench-engine`",
        "",
        f"`benchmarks/results/engine_before_after.json`, written on {report['generated_at'][:10]}: the default "
        f"(stateful) detector's CPU (user + system, from `wait4`) per 1,000 records, {report['count']:,} records, "
        f"median of {report['rounds']} rounds (their range in brackets). *Net* leaves out start-up and shutdown (a run of "
        f"{report['startup_count']:,} records subtracted), *window* counts from the first output readable to the "
        "last. [Method](index.md#other-benchmarks).",
        "",
        "| Side | Commit | CPU ms/1k | Net | Window | Start-up CPU (share) | Wall s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, side in sides.items():
        startup = f"{side['startup_cpu_s']:.1f} s ({side['startup_share']:.0%})" if "startup_cpu_s" in side else "-"
        net = f"{side['net_cpu_ms_per_1k']:.1f}" if "net_cpu_ms_per_1k" in side else "-"
        window = f"{side['window_cpu_ms_per_1k']:.1f}" if side.get("window_cpu_ms_per_1k") else "-"
        runs = [run["cpu_s"] * 1e6 / run["count"] for run in side["runs"]]
        raw = f"{side['cpu_ms_per_1k']:.1f}" + (f" ({min(runs):.1f}–{max(runs):.1f})" if len(runs) > 1 else "")
        lines.append(
            f"| {name} | `{md(side['commit'][:12])}` | {raw} | {net} | {window} | {startup} | {side['wall_s']:.1f} |"
        )
    if ratios:
        lines += [
            "",
            "After / before: "
            + ", ".join(f"{key.replace('_', ' ')} {value:.2f}×" for key, value in ratios.items())
            + ".",
        ]
    return lines + [""]


def results_page() -> str:
    latest = (RESULTS / "latest.md").read_text()
    lines = [
        "# Results",
        "",
        "Generated when the site is built from what `make bench` (and the other benchmark modules) wrote in "
        "`benchmarks/results/`: nothing on this page is typed by hand. How they are measured: "
        "[Method](index.md); what they say: [Reading the figures](readings.md).",
        "",
        "## The pipeline: `make bench`",
        "",
    ]
    lines += [f"![{name}]({name})" for name in CHARTS if (RESULTS / name).exists()]
    lines += ["", _demote(latest).strip(), ""]
    if (RESULTS / "state.md").exists():
        lines += [
            "## State, features and rules: `python -m benchmarks.state`",
            "",
            _demote((RESULTS / "state.md").read_text()).strip(),
            "",
        ]
    if (RESULTS / "engine_before_after.json").exists():
        lines += engine_table()
    if (RESULTS / "handbook-model.json").exists():
        lines += handbook_table()
    return "\n".join(lines)


def benchmark_commit() -> str:
    match = re.search(r"at commit `([0-9a-f]+)`", (RESULTS / "latest.md").read_text())
    return match.group(1) if match else ""


# -------------------------------------------------------------------------------------- module map

MODULE_FOLDERS = ("fraudstream", "fraudstream/demo", "producer", "consumer", "consumer/state")
MODULE_MAP_MARKER = "<!-- module map -->"


def _first_sentence(docstring: str) -> str:
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    return match.group(1) if match else paragraph


def module_map() -> str:
    """The module map: every module with its docstring's first sentence. A module with code and no
    docstring is a warning (a failed build under --strict): describe it where it is written."""
    lines = ["| Module | What it is |", "|---|---|"]
    for folder in MODULE_FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            text = path.read_text()
            docstring = ast.get_docstring(ast.parse(text))
            if not docstring:
                if path.name in ("__init__.py", "__main__.py"):
                    continue
                log.warning("module map: %s has no docstring", path.relative_to(ROOT))
                docstring = ""
            lines.append(f"| {code(str(path.relative_to(ROOT)))} | {md(_first_sentence(docstring))} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- ACLs

ACL_TABLE_MARKER = "<!-- acl table -->"


def acl_table() -> str:
    """fraudstream.acl's grants for an input topic T and a detector group G, as `fraudstream acl` applies them."""
    from fraudstream.acl import ROLES, grants
    from fraudstream.settings import Settings

    lines = ["| Role | What it is for | Resource | Pattern | Operations |", "|---|---|---|---|---|"]
    previous = ""
    for grant in grants(Settings(transactions_topic="T", group_id="G")):
        role = "" if grant.role == previous else f"{code(grant.role)} | {md(ROLES[grant.role])}"
        previous = grant.role
        lines.append(
            f"| {role or ' | '} | {grant.resource_type} {code(grant.name)} | {grant.pattern} | "
            f"{', '.join(grant.operations)} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- hooks

GENERATED = {
    "reference/cli.md": cli_page,
    "reference/environment.md": environment_page,
    "reference/rules-file.md": rules_file_page,
    "reference/schemas.md": schemas_page,
    "reference/metrics.md": metrics_page,
    "benchmarks/results.md": results_page,
}


def on_files(files: Files, config: Any) -> Files:
    os.environ["COLUMNS"] = "78"  # argparse wraps usage lines to the terminal's width: the page's, whatever the shell
    for uri, page in GENERATED.items():
        files.append(File.generated(config, uri, content=page()))
    for name in CHARTS + ("handbook-model.png",):
        if (RESULTS / name).exists():
            files.append(File.generated(config, f"benchmarks/{name}", abs_src_path=str(RESULTS / name)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """The module map goes where its marker is; the readings of a benchmark run say so when the results
    come from another run."""
    if MODULE_MAP_MARKER in markdown:
        markdown = markdown.replace(MODULE_MAP_MARKER, module_map())
    if ACL_TABLE_MARKER in markdown:
        markdown = markdown.replace(ACL_TABLE_MARKER, acl_table())
    match = READINGS_MARKER.search(markdown)
    if match:
        measured = benchmark_commit()
        if measured and not measured.startswith(match.group(1)) and not match.group(1).startswith(measured):
            note = (
                f'!!! warning "Written for another run"\n    These readings were written for the run at commit '
                f"`{match.group(1)}`; the [results](results.md) are now from commit `{measured}`.\n\n"
            )
            markdown = markdown.replace(match.group(0), note, 1)
    return markdown
