"""Classes by name: the class names a run stores (RUN/classes.json) and a class asked for by name or index.

A run trained on a folder with class sub-folders learns label i for the i-th sub-folder in sorted
order; the training writes those names beside the run (:func:`save_class_names`) so that every
front end takes ``cat`` as well as ``3``.  Runs without the file take indices only.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Union

from ddpmlab.errors import OPTION, OptionError

CLASSES_FILE = "classes.json"  # RUN/<this>: {"class_names": [name of label 0, name of label 1, ...]}
LIST = "list"  # asked for as a class: the front end lists the run's classes instead of sampling


def save_class_names(run_dir, names: Sequence[str]) -> Optional[Path]:
    """Write RUN/classes.json (label i is ``names[i]``); nothing (None) for a data set without names."""
    if not names:
        return None
    path = Path(run_dir) / CLASSES_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"class_names": [str(n) for n in names]}, indent=1) + "\n")
    tmp.replace(path)  # never a half-written file
    return path


def load_class_names(run_dir) -> List[str]:
    """The names RUN/classes.json stores ([] without the file; a damaged file is ignored with a warning)."""
    path = Path(run_dir) / CLASSES_FILE if run_dir is not None else None
    if path is None or not path.is_file():
        return []
    try:
        names = json.loads(path.read_text())["class_names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError("class_names is not a list of strings")
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"ignoring {path}: {type(e).__name__}: {e}; classes are taken by index only")
        return []
    return names


def describe_classes(names: Sequence[str], num_classes: int) -> str:
    """'0 cat, 1 dog' for named classes, '0..9' for classes known by index only, '' for none."""
    if not num_classes:
        return ""
    if len(names) == num_classes:
        return ", ".join(f"{i} {name}" for i, name in enumerate(names))
    return f"0..{num_classes - 1}"


def class_index(label: Union[int, str, None], names: Sequence[str], num_classes: int) -> Optional[int]:
    """The label (an index) of class ``label``: a name of ``names``, or a whole number in [0, num_classes).

    A name is matched first, so a run whose folders are named '10', '2' takes '2' as its folder.
    OptionError('class') names the valid classes in one line otherwise.
    """
    if label is None:
        return None
    if not num_classes:
        raise OptionError("class", f"{OPTION} needs a class-conditional model (trained with model.num_classes); "
                                   "this run is unconditional")
    text = str(label).strip()
    if isinstance(label, str) and len(names) == num_classes and text in names:
        return list(names).index(text)
    try:
        index = int(text)
    except ValueError:
        known = f"this run's classes are {describe_classes(names, num_classes)}" if names else \
            f"this run stores no class names (it was trained before they were kept): give an index 0..{num_classes - 1}"
        raise OptionError("class", f"{OPTION} '{text}' is not a class of this run; {known}") from None
    if not 0 <= index < num_classes:
        raise OptionError("class", f"{OPTION} {index} is out of range: this model knows classes 0..{num_classes - 1}"
                                   + (f" ({describe_classes(names, num_classes)})" if names else ""))
    return index
