"""The docs say what the code does: the README's test command is CI's, its Python example and every
`ddpm` line of the README and docs/ run against the real code, the config reference is generated from the
config dataclasses, every module is on the architecture page, links point at files, and every benchmark
table names its script, commit and CPU."""

import dataclasses
import importlib.util
import pkgutil
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pytest

import ddpmlab
from ddpmlab.cli import main
from ddpmlab.cli.parser import build_parser
from ddpmlab.config import Config
from ddpmlab.samplers import SAMPLERS
from ddpmlab.samplers.steps import STEP_SCHEDULES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
FIXTURE_RUN = ROOT / "tests" / "fixtures" / "release_0_1"
PAGES = sorted(DOCS.rglob("*.md"))


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


# ------------------------------------------------------------------------------ README


def test_readme_is_at_most_250_lines():
    n = len(README.read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines; move the detail into docs/ (at most 250)"


def test_readme_test_command_is_the_one_ci_runs():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    install = next(line for line in ci if line.startswith("bash install.sh"))
    pytest_line = next(line for line in ci if line.startswith(".venv/bin/python -m pytest"))
    command = f"{install} && {pytest_line}"
    assert command in README.read_text(), f"README.md should give CI's test command: {command}"


def test_every_bundled_config_is_in_the_readme_table():
    names = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    text = README.read_text()
    missing = [n for n in names if not re.search(rf"^\| `{re.escape(n)}`", text, flags=re.M)]
    assert not missing, f"configs missing from the README's configs table: {', '.join(missing)}"


def test_readme_python_example_draws_what_ddpm_sample_draws(tmp_path, monkeypatch):
    (example,) = _code_blocks(README.read_text(), "python")
    run_dir = re.search(r'load_run\("([^"]+)"\)', example).group(1)
    shutil.copytree(FIXTURE_RUN, tmp_path / run_dir)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(example, "README.md (python example)", "exec"), scope)
    x = scope["x"]
    assert (tmp_path / "samples.png").is_file() and scope["plan"].n == 8  # the example's last line ran
    assert main(["sample", run_dir, "--n", str(len(x)), "--seed", "0", "--out", "cli/", "--npz", "--no-progress"]) == 0
    assert np.array_equal(x.numpy(), np.load(tmp_path / "cli" / "samples.npz")["samples"])


# ------------------------------------------------------------------------------ command lines


def _command_lines() -> list[tuple[str, str]]:
    """(file, line) of every `ddpm ...` command (or `... -m ddpmlab ...`) in bash blocks of the README and docs/."""
    out = []
    for path in [README, *PAGES]:
        for block in _code_blocks(path.read_text(), "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                line = shlex.join(shlex.split(line, comments=True))
                if line.startswith("ddpm "):
                    out.append((path.relative_to(ROOT).as_posix(), line))
                elif " -m ddpmlab " in line:
                    out.append((path.relative_to(ROOT).as_posix(), "ddpm " + line.split(" -m ddpmlab ", 1)[1]))
    return out


def _is_config_key(key: str) -> bool:
    node = Config()
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return True


def _problem(line: str) -> Optional[str]:
    """What is wrong with one command line, or None: the parser refuses it, a config key, sampler or step
    schedule does not exist."""
    words = shlex.split(line, comments=True)[1:]
    try:
        args, extra = build_parser().parse_known_args(words)
    except SystemExit:
        return "the parser refuses it"
    overrides = list(getattr(args, "overrides", None) or []) + extra
    bad = [w for w in extra if "=" not in w or w.startswith("-")]
    bad += [w for w in overrides if "=" in w and not _is_config_key(w.split("=")[0])]
    if "--timesteps" in words:
        bad.append("--timesteps (the older spelling of --step-schedule)")
    for option, valid in (("--sampler", SAMPLERS), ("--step-schedule", STEP_SCHEDULES)):
        if option in words and words[words.index(option) + 1] not in valid:
            bad.append(f"{option} {words[words.index(option) + 1]}")
    return f"unknown {', '.join(bad)}" if bad else None


def test_command_lines_in_readme_and_docs_are_ones_ddpm_takes(capsys):
    lines = _command_lines()
    assert len(lines) > 50  # the README's cheat sheet and the guides' examples were found
    problems = [f"{path}: {line}: {p}" for path, line in lines if (p := _problem(line))]
    capsys.readouterr()  # argparse's own messages
    assert not problems, "command lines that ddpm would refuse:\n" + "\n".join(problems)


def test_a_wrong_command_line_is_caught(capsys):
    assert _problem("ddpm sample RUN --sampler dpmpp_9m") == "unknown --sampler dpmpp_9m"
    assert _problem("ddpm sample RUN --step-schedule karas") == "unknown --step-schedule karas"
    assert _problem("ddpm sample RUN --timesteps karras") is not None  # the docs write the glossary's words
    assert _problem("ddpm train train.stpes=10") == "unknown train.stpes=10"
    assert _problem("ddpm sample RUN --stesp 3") is not None
    assert _problem("ddpm train --config toy2d train.steps=10") is None


# ------------------------------------------------------------------------------ generated config reference


def test_config_reference_is_generated_from_the_config_dataclasses():
    page = DOCS / "reference" / "config.md"
    assert page.read_text() == _generator().render(), \
        "docs/reference/config.md is stale: run python docs/gen_config_reference.py"


@dataclasses.dataclass
class _UNet:
    # channels at full resolution
    base_channels: int = 128
    mults: list = dataclasses.field(default_factory=lambda: [1, 2])  # per level


@dataclasses.dataclass
class _DiT:
    depth: int = 28  # transformer blocks


@dataclasses.dataclass
class _Model:
    kind: Literal["unet", "dit"] = "unet"
    unet: _UNet = dataclasses.field(default_factory=_UNet)
    dit: Optional[_DiT] = None  # only for kind dit


@dataclasses.dataclass
class _Root:
    model: _Model = dataclasses.field(default_factory=_Model)
    seed: int = dataclasses.field(default=0, metadata={"help": "seeds everything"})


def test_config_reference_documents_nested_and_optional_sections(monkeypatch):
    gen = _generator()
    monkeypatch.setattr(gen, "config_module", type("M", (), {"Config": _Root}))
    lines = gen.render().splitlines()
    assert "## `model`" in lines and "### `model.unet`" in lines and "### `model.dit`: _DiT" in lines
    assert "| `model.kind` | 'unet' \\| 'dit' | `unet` |  |" in lines
    assert "| `model.unet.base_channels` | int | `128` | channels at full resolution |" in lines
    assert "| `model.unet.mults` | list | `[1, 2]` | per level |" in lines
    assert "| `model.dit` | _DiT \\| null | `null` | only for kind dit |" in lines
    assert "| `model.dit.depth` | int | `28` | transformer blocks |" in lines
    assert lines.index("## Top level") < lines.index("| `seed` | int | `0` | seeds everything |")


# ------------------------------------------------------------------------------ architecture page


def _package_modules(path: Path = Path(ddpmlab.__path__[0]), prefix: str = "ddpmlab.") -> list[str]:
    """Every module of the package, as pkgutil.walk_packages finds them, without importing any."""
    names = []
    for m in pkgutil.iter_modules([str(path)]):
        names.append(prefix + m.name)
        if m.ispkg:
            names += _package_modules(path / m.name, f"{prefix}{m.name}.")
    return names


def test_every_module_is_on_the_architecture_page():
    page = (DOCS / "architecture.md").read_text()
    named = set(re.findall(r"`(ddpmlab(?:\.\w+)*)`", page))
    modules = set(_package_modules()) | {"ddpmlab"}
    missing, stale = sorted(modules - named), sorted(named - modules)
    assert not missing, f"modules not on docs/architecture.md (add one line each): {', '.join(missing)}"
    assert not stale, f"docs/architecture.md names modules that do not exist: {', '.join(stale)}"


# ------------------------------------------------------------------------------ links and benchmarks


def test_relative_links_in_readme_and_docs_point_at_files():
    broken = []
    for path in [README, *PAGES]:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def _benchmark_tables() -> list[tuple[str, Optional[str]]]:
    """(header row, the provenance line since the last heading) of each table on the benchmarks page."""
    lines = (DOCS / "benchmarks.md").read_text().splitlines()
    tables, provenance, section = [], None, ""
    for i, line in enumerate(lines):
        if line.startswith("#"):
            provenance, section = None, line
        elif line.startswith("source:"):
            provenance = line
        elif re.match(r"\|\s*-", line) and section != "## How to read the provenance lines":
            tables.append((lines[i - 1], provenance))
    return tables


def test_every_benchmark_table_names_its_source_commit_and_cpu():
    tables = _benchmark_tables()
    assert len(tables) > 20
    unnamed = [header for header, prov in tables if not prov or not re.search(r"commit: `[0-9a-f]{7,40}`", prov)
               or "CPU: " not in prov]
    assert not unnamed, "benchmark tables without a 'source: ... · commit: ... · CPU: ...' line (one line, after " \
        "the table's heading):\n" + "\n".join(unnamed)
    scripts = {s for _, prov in tables for s in re.findall(r"`(benchmarks/\w+\.py)", prov)}
    assert all((ROOT / s).is_file() for s in scripts), [s for s in scripts if not (ROOT / s).is_file()]


def test_commits_named_on_the_benchmarks_page_exist():
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    commits = set(re.findall(r"`([0-9a-f]{7,40})`", (DOCS / "benchmarks.md").read_text()))
    git = ["git", "-C", str(ROOT), "cat-file", "-e"]
    unknown = [c for c in sorted(commits) if subprocess.run([*git, f"{c}^{{commit}}"], capture_output=True).returncode]
    assert not unknown, f"commits named on docs/benchmarks.md that git does not know: {', '.join(unknown)}"
