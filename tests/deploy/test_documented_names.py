"""What README.md, deploy/README.md and the deploy files name exists, with the defaults they quote.

The docs are read as an operator or integrator would: every setting they name (``section.key``, ``[section] key``,
``LINEINSPECT__SECTION__KEY``) is a real key, a default they quote in passing ("``streams.claim_idle_ms`` (30 s)") is
the built-in one, every ``lineinspect`` command line in code is accepted by the real CLI parser, option by option,
and the lists in the docs (metrics, Redis keys, dead-letter and error reasons, alerts) match what the code has.
config.toml, "documented inline", names every setting, each at its built-in default.
"""

from __future__ import annotations

import argparse
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from pipeline.codec import CodecErrorReason
from pipeline.config import Config, load_config
from pipeline.messages import Decision, Frame
from pipeline.metrics import Metrics
from pipeline.streams import DEAD_LETTER_PAYLOAD_BYTES, LineKeys, commit_reply_key, health_key, trimmed_unread_key
from tests.workers.processes import REPO_ROOT
from workers.cli import build_parser

DOCS = (REPO_ROOT / "README.md", REPO_ROOT / "deploy" / "README.md")
DEPLOY_SUFFIXES = {".yaml", ".yml", ".service", ".env", ".sh", ".toml"}
SECTIONS = tuple(Config.model_fields)
DOTTED_KEY = re.compile(rf"(?<![\w/.\-])({'|'.join(SECTIONS)})\.([a-z_][a-z0-9_]*)(?![\w.(/\-])")
BRACKETED_KEY = re.compile(rf"\[({'|'.join(SECTIONS)})\] ([a-z_][a-z0-9_]*)")
ENV_KEY = re.compile(r"LINEINSPECT__([A-Z0-9]+)__([A-Z0-9_]+)")
FILE_SUFFIXES = {"npy", "faiss", "py", "json", "png", "yml", "yaml", "toml", "md", "lir", "service"}
CODE_SPAN = re.compile(r"`([^`]+)`")
# Options in the docs that belong to other programs' command lines (docker compose --scale, docker build --build-arg).
FOREIGN_OPTIONS = {"--scale", "--build-arg"}
NOT_SUBCOMMANDS = {"test"}  # `deploy/lineinspect.sh test` is the script's own: ruff, mypy, pytest


def deploy_files() -> list[Path]:
    files = [REPO_ROOT / "Dockerfile"]
    files += [path for path in sorted((REPO_ROOT / "deploy").rglob("*")) if path.suffix in DEPLOY_SUFFIXES]
    return files


def code_of(path: Path) -> list[str]:
    """The text a reader takes for code: code spans and, in Markdown, indented code-block lines."""
    text = path.read_text()
    snippets = [" ".join(span.split()) for span in CODE_SPAN.findall(text)]  # a span may wrap onto the next line
    if path.suffix == ".md":
        snippets += [line.strip() for line in text.splitlines() if line.startswith("    ") and line.strip()]
    if path.name == "Dockerfile":  # the health check's command line
        snippets += [line.split("CMD ", 1)[1] for line in text.splitlines() if "CMD lineinspect" in line]
    return snippets


def section_keys(section: str) -> set[str]:
    """The keys of ``[section]``; none for a section that does not exist (LINEINSPECT__NOSUCH__KEY)."""
    field = Config.model_fields.get(section)
    return set(getattr(field.annotation, "model_fields", {})) if field is not None else set()


def named_settings(text: str) -> set[tuple[str, str]]:
    dotted = {(section, key) for section, key in DOTTED_KEY.findall(text) if key not in FILE_SUFFIXES}
    env = {(section.lower(), key.lower()) for section, key in ENV_KEY.findall(text)}
    return dotted | set(BRACKETED_KEY.findall(text)) | env


def test_the_finders_catch_a_misspelt_key_and_pass_file_names_and_longer_paths() -> None:
    names = named_settings("`streams.max_len`, `[scoring] shiftpixels`, LINEINSPECT__WORKER__HEALTHPORT, `bank.npy`")
    assert names == {("streams", "max_len"), ("scoring", "shiftpixels"), ("worker", "healthport")}
    assert not section_keys("nosuch") and "max_frame_bytes" in section_keys("streams")
    assert named_settings("`redis.cluster.RedisCluster` in `pipeline/streams.py`, models.images, sink.heatmap_dir") == {
        ("sink", "heatmap_dir")
    }


@pytest.mark.parametrize("path", [*DOCS, *deploy_files()], ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_every_setting_a_doc_or_deploy_file_names_exists(path: Path) -> None:
    text = path.read_text() if path.suffix != ".md" else "\n".join(code_of(path))
    unknown = sorted(f"{section}.{key}" for section, key in named_settings(text) if key not in section_keys(section))
    assert not unknown, f"{path.name} names settings that pipeline/config.py does not have: {unknown}"


UNITS_S = {None: 1.0, "s": 1.0, "ms": 0.001, "min": 60.0}
QUOTED_DEFAULT = re.compile(r"`([a-z_]+)\.([a-z_]+)` \((\d[\d,.]*) ?(s|ms|min)?\)")


def test_defaults_quoted_in_passing_are_the_built_in_ones() -> None:
    defaults = load_config(None, environ={}).model_dump()
    quoted = [match for path in DOCS for match in QUOTED_DEFAULT.findall(path.read_text())]
    assert len(quoted) >= 5  # the pattern still finds the docs' "`streams.claim_idle_ms` (30 s)" and the like
    for section, key, number, unit in quoted:
        key_unit_s = 0.001 if key.endswith("_ms") else 1.0
        expected = float(number.replace(",", "")) * UNITS_S[unit or None] / (key_unit_s if unit else 1.0)
        assert defaults[section][key] == pytest.approx(expected), f"docs say {section}.{key} ({number} {unit})"


def test_defaults_the_docs_spell_out_are_the_built_in_ones() -> None:
    defaults = load_config(None, environ={})
    readme, deploy_readme = (path.read_text() for path in DOCS)
    claims = {
        (deploy_readme, "`config.toml`'s defaults are `health_port = 0`"): defaults.worker.health_port == 0,
        (deploy_readme, "`metrics_port = 9110`"): defaults.sink.metrics_port == 9110,
        (deploy_readme, "`redis.connect_timeout_s` + `streams.block_ms`: 5.2 s by default"): (
            defaults.redis.connect_timeout_s + defaults.streams.block_ms / 1000 == pytest.approx(5.2)
        ),
        (readme, "`[scoring] shift_pixels = 2`"): defaults.scoring.shift_pixels == 2,
        (readme, 'The default `[model] intensity = "auto"`'): defaults.model.intensity == "auto",
        (readme, '`[model] registration = "auto"` (the default)'): defaults.model.registration == "auto",
        (readme, "[--false-reject-rate 0.005]"): defaults.threshold.false_reject_rate == 0.005,
        (readme, "cut to its first 64 KiB"): DEAD_LETTER_PAYLOAD_BYTES == 64 * 1024,
        (readme, "`streams.max_frame_bytes`, 16 MiB"): defaults.streams.max_frame_bytes == 16 * 2**20,
    }
    for (doc, phrase), holds in claims.items():
        assert phrase in doc, f"the docs no longer say {phrase!r}: update this test with them"
        assert holds, f"the docs say {phrase!r}, the code differs"


# -- command lines ---------------------------------------------------------------------------------------------------


def subcommand_options() -> dict[str, set[str]]:
    parser = build_parser()
    (subparsers,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return {name: set(sub._option_string_actions) for name, sub in subparsers.choices.items()}


# `lineinspect` as the program: at the start of a snippet, in a venv's bin/ or deploy/, or after `--` (kubectl exec);
# not a user, group or namespace called lineinspect (`useradd ... lineinspect`, `kubectl -n lineinspect get`).
COMMAND = re.compile(r"(?:^|bin/|deploy/|-- )lineinspect(?:\.sh)? +([a-z][\w-]*)([^#`;|&]*)", re.M)


def command_lines(snippet: str) -> list[tuple[str, list[str]]]:
    """``(subcommand, its --options)`` for each ``lineinspect SUBCOMMAND ...`` in a snippet of code."""
    found = []
    for subcommand, rest in COMMAND.findall(snippet):
        try:
            words = shlex.split(rest.replace("[", " ").replace("]", " "))
        except ValueError:  # an unbalanced quote in prose-like code: fall back to spaces
            words = rest.split()
        found.append((subcommand, [word.split("=", 1)[0] for word in words if word.startswith("--")]))
    return found


def test_the_command_finder_reads_options_and_stops_at_comments() -> None:
    assert command_lines("lineinspect score --model M IMAGE... [--heatmaps DIR] [--json]  # offline") == [
        ("score", ["--model", "--heatmaps", "--json"])
    ]
    assert command_lines("bash deploy/lineinspect.sh run --frames 200    # the main job --not-this") == [
        ("run", ["--frames"])
    ]


@pytest.mark.parametrize("path", [*DOCS, *deploy_files()], ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_every_lineinspect_command_line_in_code_uses_real_subcommands_and_options(path: Path) -> None:
    options = subcommand_options()
    wrong = []
    for snippet in code_of(path):
        for subcommand, used in command_lines(snippet):
            if subcommand in NOT_SUBCOMMANDS:
                continue
            if subcommand not in options:
                wrong.append(f"{snippet!r}: no subcommand {subcommand!r}")
                continue
            wrong += [
                f"{snippet!r}: `{subcommand}` has no {option}" for option in used if option not in options[subcommand]
            ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_every_option_the_docs_mention_belongs_to_some_subcommand(path: Path) -> None:
    """Options quoted on their own (`--timeout-s` (120), `--speed 1`) belong to some lineinspect subcommand."""
    known = set().union(*subcommand_options().values()) | FOREIGN_OPTIONS
    lone = {
        option
        for snippet in CODE_SPAN.findall(path.read_text())
        if snippet.startswith("--")
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", snippet)
    }
    assert lone and lone <= known, sorted(lone - known)


def test_replays_documented_timeout_is_its_default() -> None:
    readme = DOCS[0].read_text()
    assert "`--timeout-s` (120)" in readme
    replay = build_parser().parse_args(["replay", "file.lir", "--line", "shadow"])
    assert replay.timeout_s == 120


# -- lists in the docs -----------------------------------------------------------------------------------------------


def readme_section(title: str, until: str) -> str:
    return DOCS[0].read_text().split(title, 1)[1].split(until, 1)[0]


def test_the_readmes_metric_list_is_what_the_workers_export() -> None:
    documented = dict(re.findall(r"`(lineinspect_\w+)(?:\{([^}]*)\})?`", readme_section("### Metrics", "Latency")))
    exported: dict[str, str] = {"lineinspect_redis_up": ""}
    for collector in vars(Metrics()).values():
        if isinstance(collector, MetricWrapperBase):
            family = next(iter(collector.describe()))
            name = f"{family.name}_total" if family.type == "counter" else family.name
            exported[name] = ",".join(collector._labelnames)
    assert documented == exported


def test_the_readmes_redis_key_table_is_what_the_streams_module_uses() -> None:
    table = readme_section("### Redis keys", "Every stream")
    documented = set(re.findall(r"^\| `([^`]+)` \|", table, re.M))
    keys = LineKeys("P", "L")
    used = {keys.frames, keys.results, keys.decisions, keys.deadletter, keys.model, keys.published("<frame_id>"),
            trimmed_unread_key(keys.frames), commit_reply_key(keys.deadletter, "<token>")}  # fmt: skip
    assert documented == used | {health_key("P", "<role>", "<name>")}


def test_the_readmes_frame_table_has_the_frames_fields_and_the_decision_fields_it_names_exist() -> None:
    section = readme_section("### Publishing frames from your own software", "### Metrics")
    rows = re.findall(r"^\| (`[^|]+) \|", section, re.M)
    documented = {name for row in rows for name in re.findall(r"`(\w+)`", row)}
    assert documented == set(Frame.model_fields)
    decisions = section.split("Each frame's decision arrives", 1)[1].split("When the line is behind", 1)[0]
    named = set(re.findall(r"`([a-z_]+)`", decisions)) - {"pass", "fail", "error", "payload"}
    assert named and named <= set(Decision.model_fields), sorted(named - set(Decision.model_fields))


def quoted_list(text: str, start: str) -> set[str]:
    """The code-span words of the sentence that begins with ``start``."""
    sentence = text.split(start, 1)[1].split(". ", 1)[0]
    return set(re.findall(r"`([a-z_]+)`", sentence))


def source_literals() -> str:
    return "\n".join(
        path.read_text() for folder in ("pipeline", "workers") for path in (REPO_ROOT / folder).glob("*.py")
    )


def test_the_readmes_dead_letter_and_error_reasons_are_the_codes() -> None:
    readme = DOCS[0].read_text()
    dead_letter = quoted_list(readme, "Dead-letter reasons:")
    assert {reason.value for reason in CodecErrorReason} <= dead_letter  # every decoding failure is documented
    error_only = quoted_list(readme, "An `error` decision's `error_reason`")
    assert error_only, "the README no longer lists the error reasons that are not dead letters"
    source = source_literals()
    for reason in sorted(dead_letter | error_only):
        assert f'"{reason}"' in source, f"README names the reason {reason!r}, which no worker gives"


def test_the_alert_table_is_alerts_yml() -> None:
    rules = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    alerts: dict[str, Any] = {
        rule["alert"]: rule.get("for") for group in rules["groups"] for rule in group["rules"] if "alert" in rule
    }
    rows = re.findall(r"^\| `(Lineinspect\w+)`.*\| ([^|]+) \|$", DOCS[1].read_text(), re.M)
    documented = {name: durations.strip().replace(" ", "") for name, durations in rows}
    assert documented == {name: duration or "—" for name, duration in alerts.items()}


# -- config.toml -----------------------------------------------------------------------------------------------------


def config_toml_sections() -> dict[str, str]:
    """Each ``[section]`` of config.toml with its text (comments included)."""
    text = (REPO_ROOT / "config.toml").read_text()
    parts = re.split(r"^\[(\w+)\]\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_config_toml_names_every_setting_at_its_built_in_default() -> None:
    sections = config_toml_sections()
    data = tomllib.loads((REPO_ROOT / "config.toml").read_text())
    defaults = load_config(None, environ={}).model_dump(mode="json")
    from_file = load_config(REPO_ROOT / "config.toml", environ={}).model_dump(mode="json")
    missing = []
    for section in SECTIONS:
        for key in section_keys(section):
            set_or_shown = rf"^#? ?{key} *=|^# \[\[{section}\.{key}\]\]"
            if not re.search(set_or_shown, sections.get(section, ""), re.M):
                missing.append(f"{section}.{key}")
            elif key in data.get(section, {}):
                assert from_file[section][key] == defaults[section][key], f"config.toml sets {section}.{key}"
    assert not missing, f"config.toml does not name {missing} (set it, or show it commented out)"
