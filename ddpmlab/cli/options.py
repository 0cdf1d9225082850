"""How the command line names each option of the library, its older spellings, and the requests its options make.

The library names an option by its own word ('steps', 'step_schedule', 'class'); an error about
one (:class:`~ddpmlab.errors.OptionError`) is named here, once, where ``main`` catches it.
Older spellings (``--timesteps NAME`` for ``--step-schedule NAME``, ``--variance beta`` for
``fixed_large``, ...) are read here only, each with a one-line note of the new spelling; the
library takes the words of the glossary (docs/glossary.md).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from ddpmlab.runs import LIST, Run, SamplingRequest
from ddpmlab.runs.prompts import read_prompts_file

# the library's name of an option -> how a user sets it on the command line
NAMES = {"sampler": "--sampler", "steps": "--steps", "step_schedule": "--step-schedule", "eta": "--eta",
         "variance": "--variance", "threshold": "--threshold", "class": "--class", "guidance": "--guidance",
         "weights": "--weights", "device": "--device", "out": "--out", "n": "--n", "batch_size": "--batch-size",
         "strength": "--strength", "metrics": "--metrics", "extractor": "--extractor",
         "inception_weights": "--inception-weights", "reference_steps": "--reference-steps", "timesteps": "--t",
         "samplers": "--samplers", "nfe": "--nfe", "image": "--image", "mask": "--mask", "resize": "--resize",
         "prompt": "--prompt", "negative_prompt": "--negative-prompt"}
# older words for the reverse variances (diffusion.reverse.VARIANCES), read at the command line only
VARIANCE_ALIASES = {"beta": "fixed_large", "posterior": "fixed_small", "learned": "learned_range"}


def note(text: str) -> None:
    """One line on stderr that is not an error (an older spelling was read)."""
    print(f"note: {text}", file=sys.stderr)


class OlderSpelling(argparse.Action):
    """An option's older spelling: stored as ``new`` stores it, after a one-line note of ``new``."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        note(f"{option_string} is now spelled {self.new}")
        setattr(namespace, self.dest, values)


class VarianceName(argparse.Action):
    """``--variance NAME``: an older word (beta, posterior, learned) becomes the library's, with a note."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values in VARIANCE_ALIASES:
            note(f"{option_string} {values} is now spelled {option_string} {VARIANCE_ALIASES[values]}")
            values = VARIANCE_ALIASES[values]
        setattr(namespace, self.dest, values)


def sampling_request(args, n: Optional[int] = None, **fields) -> SamplingRequest:
    """The request the sampling options of ``args`` make (None where an option is not given)."""
    options = {"eta": getattr(args, "eta", None), "variance": getattr(args, "variance", None),
               "threshold": getattr(args, "threshold", None)}
    return SamplingRequest(sampler=args.sampler, steps=args.steps, step_schedule=args.step_schedule, options=options,
                           label=getattr(args, "label", None), guidance=getattr(args, "guidance", None),
                           seed=args.seed, n=args.n if n is None else n, prompts=prompts_asked(args),
                           negative_prompt=getattr(args, "negative_prompt", None), **fields)


def prompts_asked(args) -> Optional[list]:
    """The prompts of --prompt (each) and --prompts FILE (one a line), in that order; None for neither."""
    prompts = list(getattr(args, "prompt", None) or [])
    if getattr(args, "prompts_file", None):
        prompts += read_prompts_file(args.prompts_file)
    return prompts or None


def listed_classes(args, run: Run) -> bool:
    """``--class list``: print the run's classes (True: the command is done), else False."""
    if getattr(args, "label", None) != LIST:
        return False
    classes = run.describe_classes()
    if not classes:
        print(f"{args.run_dir} is unconditional: it has no classes")
    elif run.class_names:
        print(f"classes of {args.run_dir} (--class takes a name or an index): {classes}")
    else:
        print(f"classes of {args.run_dir}: {classes} (it stores no class names: --class takes an index)")
    return True
