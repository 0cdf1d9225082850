"""Reading and writing configs: YAML files and ``key=value`` overrides in, checked against the dataclasses'
types (unknown keys refused with a suggestion, earlier spellings read with a note), validated; YAML out."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from ddpmlab.config.sections import BUNDLED_DIR, CONFIG_VERSION, RENAMED_KEYS, SECTIONS, Config
from ddpmlab.config.validate import CHOICES, validate
from ddpmlab.errors import ConfigError


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"


def _coerce(value: Any, typ: Any, key: str, source: str) -> Any:
    """Check (and gently convert) ``value`` to the annotated type ``typ``."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(typ) if a is not type(None)]
        return _coerce(value, inner, key, source)
    if typ is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if value is False and "no" in CHOICES.get(key, ()):  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    return value


@functools.lru_cache(maxsize=None)  # the classes never change; resolving their hints is slow
def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_classes() -> dict[str, type]:
    return {s: _section_types(Config)[s] for s in SECTIONS}


@functools.lru_cache(maxsize=None)
def _all_keys() -> list[str]:
    """Every config key, ``section.field``, in declaration order, then ``version``."""
    keys = [f"{s}.{f.name}" for s, cls in _section_classes().items() for f in dataclasses.fields(cls)]
    return keys + ["version", "stage"]


SQUARE_KEYS = ("data.image_size", "data.low_res")  # one number n means [n, n]


def _apply(cfg: Config, key: str, value: Any, source: str, renamed: Optional[list] = None) -> None:
    """Set ``key`` (section.field) to ``value``, checked against its type.  A key of an earlier spelling
    (:data:`RENAMED_KEYS`) sets its new name and is appended to ``renamed`` (or noted at once)."""
    if key == "version":
        cfg.version = _coerce(value, int, key, source)
        return
    if key == "stage":
        cfg.stage = _coerce(value, str, key, source)
        return
    if key in RENAMED_KEYS:
        if renamed is None:
            _note_renamed(source, [key])
        else:
            renamed.append(key)
        key = RENAMED_KEYS[key]
    all_keys = _all_keys()
    parts = key.split(".")
    if key not in all_keys:
        raise ConfigError(f"{source}: unknown config key '{key}'{_suggest(key, all_keys)}")
    section = getattr(cfg, parts[0])
    typ = _section_types(type(section))[parts[1]]
    value = _coerce(value, typ, key, source)
    if key in SQUARE_KEYS and isinstance(value, list) and len(value) == 1:
        value = [value[0], value[0]]
    setattr(section, parts[1], value)


def _note_renamed(source: str, keys: list) -> None:
    """One line on stderr: which keys of ``source`` have a new spelling."""
    if keys:
        names = ", ".join(f"{k} -> {RENAMED_KEYS[k]}" for k in keys)
        print(f"note: {source}: keys read under their new names ({names}); write them so to silence this",
              file=sys.stderr)


def _flatten(d: dict, source: str, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and prefix == "":
            if k not in SECTIONS:
                valid = [*SECTIONS, "version", "stage"]
                raise ConfigError(f"{source}: unknown config section '{k}'{_suggest(k, valid)}")
            flat.update(_flatten(v, source, prefix=f"{k}."))
        else:
            flat[name] = v
    return flat


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a bundled config (``mnist``, ``toy2d``, ``cifar10``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = BUNDLED_DIR / f"{name_or_path}.yaml"
    if bundled.is_file() and path.suffix == "":
        return bundled
    names = sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml"))
    raise ConfigError(
        f"config file '{name_or_path}' not found; give a path to a YAML file or one of the "
        f"bundled configs: {', '.join(names)}"
    )


def _yaml_error(source: str, e: yaml.YAMLError, column_offset: int = 0) -> ConfigError:
    """One line: ``source: line L, column C: problem`` (1-based, as editors count)."""
    mark = getattr(e, "problem_mark", None)  # only MarkedYAMLError has one
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if mark is None:
        return ConfigError(f"{source}: not valid YAML ({problem})")
    column = mark.column + 1 + (column_offset if mark.line == 0 else 0)
    return ConfigError(f"{source}: line {mark.line + 1}, column {column}: {problem}")


def parse_value(text: str, source: str = "command line", column_offset: int = 0) -> Any:
    """Parse the right-hand side of a ``key=value`` override with YAML rules.

    Text that is not valid YAML raises a :class:`ConfigError` naming ``source`` and the
    column (counted from ``column_offset``, e.g. the length of ``key=``).
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _yaml_error(source, e, column_offset) from None


def apply_overrides(d: dict, overrides: Sequence[str], allowed: Callable[[str], bool],
                    refusal: Callable[[str], str], example: str) -> dict:
    """Set the ``key=value`` items of ``overrides`` in the config dict ``d`` (a run's config from
    ``Config.to_dict()``, as a derived run starts from it), each value read as YAML; a key ``allowed`` refuses
    raises ConfigError(refusal(key)), an item without '=' one showing ``example``.  Types and keys are checked
    when the dict becomes a config (:func:`config_from_dict`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. {example}")
        key, text = (p.strip() for p in item.split("=", 1))
        if not allowed(key):
            raise ConfigError(refusal(key))
        section, _, name = key.partition(".")
        d[section][name] = parse_value(text, f"command line: {item}", column_offset=len(key) + 1)
    return d


def _load_file(cfg: Config, file: Path) -> None:
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise _yaml_error(str(file), e) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a mapping of sections ({', '.join(SECTIONS)})")
    renamed: list = []
    for key, value in _flatten(raw, str(file)).items():
        _apply(cfg, key, value, str(file), renamed)
    _note_renamed(str(file), renamed)


def _apply_override(cfg: Config, item: str, renamed: Optional[list] = None) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. train.steps=1000")
    key, text = item.split("=", 1)
    value = parse_value(text, f"command line: {item}", column_offset=len(key) + 1)
    _apply(cfg, key.strip(), value, "command line", renamed)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Build a validated :class:`Config` from a YAML file and ``key=value`` overrides."""
    cfg = Config()
    file = resolve_config_path(path) if path is not None else None
    if file is not None:
        _load_file(cfg, file)
    renamed: list = []
    for item in overrides or []:
        _apply_override(cfg, item, renamed)
    _note_renamed("command line", renamed)
    sources = ([str(file)] if file is not None else []) + (["command line"] if overrides else [])
    validate(cfg, source=" + ".join(sources) or "config")
    return cfg


def config_from_dict(d: dict, source: str = "config") -> Config:
    cfg = Config()
    renamed: list = []
    for key, value in _flatten(d, source).items():
        _apply(cfg, key, value, source, renamed)
    _note_renamed(source, renamed)
    validate(cfg, source=source)
    return cfg


def format_config(cfg: Config) -> str:
    """The resolved config as YAML text (what ``save_config`` writes; :func:`load_config` reads it back)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: Path) -> None:
    Path(path).write_text(format_config(cfg))


# ---------------------------------------------------------------- the keys as text

def _field_comments(cls: type) -> dict[str, str]:
    """Each field's ``#`` comments in the class source: the comment-only lines just above it, then its own."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. a frozen install): no meanings
        return {}
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign):
            continue
        first = node.lineno
        while first - 1 in comments and lines[first - 2].lstrip().startswith("#"):
            first -= 1
        texts = [comments[n] for n in range(first, node.end_lineno + 1) if n in comments]
        out[node.target.id] = " ".join(texts)
    return out


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is typing.Union:  # Optional[X]
        (inner,) = [a for a in typing.get_args(typ) if a is not type(None)]
        return f"{_type_name(inner)}|null"
    return "list" if typing.get_origin(typ) is list else getattr(typ, "__name__", str(typ))


def _yaml_value(value: Any) -> str:
    """A value as one line of YAML flow style: ``[32, 32]``, ``null``, ``true``, ``'no'``."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()


def _describe_rows(cfg: Config) -> list[tuple[str, str, str, str]]:
    """(key, type, value, meaning) of every key of ``cfg``, in declaration order."""
    rows = []
    for section, cls in _section_classes().items():
        meanings, types = _field_comments(cls), _section_types(cls)
        for f in dataclasses.fields(cls):
            value = _yaml_value(getattr(getattr(cfg, section), f.name))
            rows.append((f"{section}.{f.name}", _type_name(types[f.name]), value, meanings.get(f.name, "")))
    version_meaning = f"config format version (this ddpmlab reads {CONFIG_VERSION})"
    return rows + [("version", "int", _yaml_value(cfg.version), version_meaning)]


def describe_config(cfg: Optional[Config] = None) -> str:
    """Every config key, one line each: ``section.key  type  default  meaning``.

    Defaults are those of ``cfg`` (e.g. a bundled config), else the dataclass defaults;
    meanings are the field comments of the dataclasses.
    """
    rows = _describe_rows(cfg if cfg is not None else Config())
    widths = [max(len(r[k]) for r in rows) for k in range(3)]
    lines = ("  ".join(r[k].ljust(widths[k]) for k in range(3)) + "  " + r[3] for r in rows)
    return "".join(line.rstrip() + "\n" for line in lines)
