"""WebDataset tar shards: where they are, and their samples read one after another, never a whole shard in memory.

A shard is a plain tar file whose members are grouped into samples by their key, as WebDataset writes them:
``dir/000042.png``, ``dir/000042.txt`` and ``dir/000042.cls`` are the image, the caption(s) and the class label of
the sample ``dir/000042`` (the key is the name up to the first dot of its last part; a sample's members are
consecutive).  ``txt``: one caption a line (a blank file: the empty caption), UTF-8; ``cls``: an integer label.

``data.path`` names the shards: a folder (its ``.tar``/``.tar.gz``/``.tgz`` files, sorted), a local pattern with
braces and globs (``shards/train-{000000..000099}.tar``, ``shards/*.tar``), an ``http(s)://`` address, or
``pipe:COMMAND`` whose standard output is the tar stream (``pipe:aws s3 cp s3://bucket/train-{000..099}.tar -``;
the command runs in a shell, as WebDataset runs it: only name commands you trust).  Several of them with ``::``.

The rules of bad input, the same whether a shard is read for training or only counted
(:func:`count_samples`), so that a resumed run skips exactly what the first run read: a sample without an
image member, whose image is no picture Pillow identifies from its header, without a caption (or with one
that is not UTF-8) where captions are needed, or without a label in ``0..num_classes-1`` where labels are
needed, is **skipped**; a shard that cannot be opened, or that breaks off, is read up to the break.  Each shard
with skipped samples is reported in one warning line per process, its reasons counted (:class:`ShardReport`).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import subprocess
import tarfile
import urllib.request
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

from ddpmlab.data.images import open_image
from ddpmlab.errors import DataError

SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")  # member suffixes read as the image
_READ = (*IMAGE_MEMBERS, "txt", "cls")  # the members a sample's use reads
INDEX_FILE = "shards.json"  # written by `ddpm data shards`: each shard's sample count, captions, class names
_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")
_ALTERNATIVES = re.compile(r"\{([^{}]*,[^{}]*)\}")
_NAME = re.compile(r"[^/\s'\"]+\.(?:tar|tar\.gz|tgz)(?=$|[\s'\"?])")


def expand_braces(pattern: str) -> list[str]:
    """Bash's brace expansion: ``a-{00..02}.tar`` -> a-00.tar, a-01.tar, a-02.tar (zero padding as written),
    ``{train,val}.tar`` -> train.tar, val.tar; several braces multiply, left to right."""
    found = [m for m in (_RANGE.search(pattern), _ALTERNATIVES.search(pattern)) if m is not None]
    if not found:
        return [pattern]
    m = min(found, key=lambda m: m.start())
    head, tail = pattern[:m.start()], pattern[m.end():]
    if m.re is _RANGE:
        lo, hi = int(m.group(1)), int(m.group(2))
        padded = any(len(g.lstrip("-")) > 1 and g.lstrip("-").startswith("0") for g in m.groups())
        width = max(len(m.group(1)), len(m.group(2))) if padded else 0
        step = 1 if hi >= lo else -1
        parts = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        parts = m.group(1).split(",")
    return [out for part in parts for out in expand_braces(head + part + tail)]


def is_remote(url: str) -> bool:
    return url.startswith(("pipe:", "http://", "https://"))


def shard_name(url: str) -> str:
    """A shard's file name (``pipe:curl -s https://host/train-000001.tar`` -> ``train-000001.tar``): what
    ``shards.json`` lists and messages name."""
    found = _NAME.findall(url)
    return found[-1] if found else os.path.basename(url.rstrip("/")) or url


def shard_list(path: str) -> list[str]:
    """The shards ``data.path`` names, in order (see the module docstring); one-line DataError when there are none."""
    shards: list[str] = []
    for part in str(path).split("::"):
        shards += _one_source(part.strip())
    if not shards:
        raise DataError(f"data.path: '{path}' names no shard; give a folder of .tar files or a pattern such as "
                        "shards/train-{000000..000099}.tar")
    return shards


def _one_source(part: str) -> list[str]:
    if is_remote(part):
        return expand_braces(part)
    folder = os.path.expanduser(part)
    if os.path.isdir(folder):
        found = sorted(f for f in os.listdir(folder) if f.endswith(SHARD_EXTENSIONS) and not f.startswith("."))
        if not found:
            raise DataError(f"data.path: folder '{folder}' holds no .tar shard; write shards with `ddpm data shards "
                            f"SRC {folder}` or point data.path at a folder of .tar files")
        return [os.path.join(folder, f) for f in found]
    out = []
    for name in expand_braces(folder):
        matches = sorted(glob.glob(name)) if glob.has_magic(name) else [name]
        missing = [m for m in matches if not os.path.isfile(m)]
        if missing or not matches:
            raise DataError(f"data.path: shard '{missing[0] if missing else name}' does not exist (from '{part}'); "
                            f"check the pattern (relative paths start from '{os.getcwd()}')")
        out += matches
    return out


def read_index(path: str) -> dict:
    """``shards.json`` beside local shards (a folder's, or the folder of the first shard of a pattern), or {}."""
    first = str(path).split("::")[0].strip()
    if is_remote(first):
        return {}
    folder = os.path.expanduser(first)
    folder = folder if os.path.isdir(folder) else os.path.dirname(folder)
    index = os.path.join(folder, INDEX_FILE)
    if not os.path.isfile(index):
        return {}
    try:
        with open(index, encoding="utf-8") as f:
            table = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"data.path: '{index}' is not a readable shard index ({e}); delete it (the shards are then "
                        "counted by reading them)") from None
    if not isinstance(table, dict) or not isinstance(table.get("shards"), dict):
        raise DataError(f"data.path: '{index}' has no \"shards\" table; delete it (the shards are then counted by "
                        "reading them)")
    return table


@dataclass(frozen=True)
class Rules:
    """What a sample needs to be used: a caption (a text run), a label below ``num_classes`` (0: none needed)."""

    captions: bool = False
    num_classes: int = 0


@dataclass
class Sample:
    key: str  # "<shard name>/<key in the shard>": unique over the shards, names the sample in messages
    image: bytes  # the image member's encoded bytes
    captions: tuple
    label: int


@dataclass
class ShardReport:
    """What reading one shard skipped: samples per reason (with a first example), where it broke off."""

    shard: str  # its name (messages)
    url: str = ""  # where it is read from
    samples: int = 0  # samples used
    skipped: Counter = field(default_factory=Counter)
    example: dict = field(default_factory=dict)  # reason -> the first sample skipped for it
    broke: str = ""  # why the shard ended early ("" : it did not)
    undecodable: int = 0  # used samples whose pixels do not decode (ddpmlab.data.stream replaces them)

    def skip(self, reason: str, key: str) -> None:
        self.skipped[reason] += 1
        self.example.setdefault(reason, key)

    def line(self) -> str:
        """One warning line, or "" when nothing was skipped."""
        if not self.skipped and not self.broke and not self.undecodable:
            return ""
        total = self.samples + sum(self.skipped.values())
        reasons = "; ".join(f"{n} {r}, e.g. '{self.example[r]}'" for r, n in self.skipped.most_common())
        line = f"data.path: shard '{self.shard}': skipped {sum(self.skipped.values())} of {total} samples"
        line += f" ({reasons})" if reasons else ""
        if self.undecodable:
            line += (f"; {self.undecodable} image(s) that do not decode, e.g. '{self.example['undecodable']}', each "
                     "replaced by another sample of its shuffle block")
        return line + (f"; {self.broke}" if self.broke else "")


_warned: set = set()  # shards reported by this process


def warn_once(report: ShardReport) -> None:
    """The report's warning line, the first time this process reads the shard with something skipped."""
    line = report.line()
    if line and (report.url or report.shard) not in _warned:
        _warned.add(report.url or report.shard)
        warnings.warn(line, stacklevel=2)


def _captions(data: bytes) -> Optional[tuple]:
    """The captions of a ``txt`` member (each non-blank line; blank: one empty caption); None if not UTF-8."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    lines = [line.strip() for line in text.split("\n")]
    return tuple(line for line in lines if line) or ("",)


def _label(data: bytes, num_classes: int) -> Optional[int]:
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return label if 0 <= label < num_classes else None


def _check(group: dict, rules: Rules) -> tuple[str, Optional[Sample]]:
    """(the reason a group of members is skipped, "" when used; the sample)."""
    image = next((group[s] for s in IMAGE_MEMBERS if s in group), None)
    if image is None:
        return "without an image member", None
    captions = ("",)
    if rules.captions:
        if "txt" not in group:
            return "without a caption (.txt)", None
        captions = _captions(group["txt"])
        if captions is None:
            return "with a caption that is not UTF-8", None
    label = 0
    if rules.num_classes:
        label = _label(group["cls"], rules.num_classes) if "cls" in group else None
        if label is None:
            return f"without a label (.cls) in 0..{rules.num_classes - 1}", None
    try:
        open_image(io.BytesIO(image)).close()  # the header only: no pixel is decoded
    except Exception as e:  # noqa: BLE001 - any failure to identify the picture skips the sample
        return f"whose image is not a picture ({type(e).__name__})", None
    return "", Sample("", image, captions, label)


def _open(url: str):
    """(a binary stream of the shard, the subprocess of a ``pipe:`` source or None)."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)  # WebDataset's pipe: convention
        return proc.stdout, proc
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=60), None
    return open(url, "rb"), None


def _split(name: str) -> tuple[str, str]:
    """WebDataset's key and suffix of a member name: ``a/b.seg.png`` -> (``a/b``, ``seg.png``)."""
    folder, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


def read_samples(url: str, rules: Rules, report: Optional[ShardReport] = None) -> Iterator[Sample]:
    """The usable samples of one shard in their order, streamed (only the members of one sample in memory);
    what is skipped goes to ``report``."""
    name = shard_name(url)
    report = report if report is not None else ShardReport(name, url)
    try:
        stream, proc = _open(url)
    except OSError as e:
        report.broke = f"cannot open it ({type(e).__name__}: {e})"
        return
    key, group = None, {}

    def finish():
        reason, sample = _check(group, rules)
        if reason:
            report.skip(reason, f"{name}/{key}")
            return None
        sample.key = f"{name}/{key}"
        report.samples += 1
        return sample

    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                tar.members = []  # a stream: no list of every member read so far
                if not member.isfile():
                    continue
                k, suffix = _split(member.name)
                if not suffix or member.name.rpartition("/")[2].startswith((".", "__")):
                    continue  # no suffix, hidden files (macOS resource forks), WebDataset's __key__-style metadata
                if k != key and group:
                    sample = finish()
                    if sample is not None:
                        yield sample
                    group = {}
                key = k
                group[suffix] = tar.extractfile(member).read() if suffix in _READ else b""  # json, npy, ...: unread
        if group:  # the shard ended cleanly: its last sample is whole
            sample = finish()
            if sample is not None:
                yield sample
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        report.broke = f"it breaks off after {report.samples + sum(report.skipped.values())} samples " \
                       f"({type(e).__name__}: {' '.join(str(e).split()) or 'unreadable'})"
    finally:
        if proc is not None:
            killed = proc.poll() is None  # stopped before its end: the command is ours to end
            if killed:
                proc.kill()
            if proc.wait() and not killed and not report.broke:
                report.broke = f"its command exited with status {proc.returncode}"


_counts: dict = {}  # (shard, rules) -> usable samples, counted by this process


def count_samples(url: str, rules: Rules, index: Optional[dict] = None) -> int:
    """The usable samples of a shard: from ``shards.json`` (:func:`read_index`) where it covers ``rules``, else
    by reading the shard once (no pixel decoded) and remembering the count."""
    known = index_count(url, rules, index or {})
    if known is not None:
        return known
    if (url, rules) not in _counts:
        _counts[(url, rules)] = sum(1 for _ in read_samples(url, rules))
    return _counts[(url, rules)]


def index_count(url: str, rules: Rules, index: dict) -> Optional[int]:
    entry = index.get("shards", {}).get(shard_name(url))
    if not isinstance(entry, dict) or not isinstance(entry.get("samples"), int):
        return None
    if rules.captions and not index.get("captions"):
        return None
    if rules.num_classes and not (index.get("labels") and len(index.get("class_names", [])) <= rules.num_classes):
        return None
    return entry["samples"]
