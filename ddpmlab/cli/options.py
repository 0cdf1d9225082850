"""How the command line names each option of the library, and the requests its options make.

The library names an option by its own word ('steps', 'step_schedule', 'class'); an error about
one (:class:`~ddpmlab.errors.OptionError`) is named here, once, where ``main`` catches it.
"""

from __future__ import annotations

from typing import Optional

from ddpmlab.runs import LIST, Run, SamplingRequest

# the library's name of an option -> how a user sets it on the command line
NAMES = {"sampler": "--sampler", "steps": "--steps", "step_schedule": "--timesteps", "eta": "--eta",
         "variance": "--variance", "threshold": "--threshold", "class": "--class", "guidance": "--guidance",
         "weights": "--weights", "device": "--device", "out": "--out", "n": "--n", "batch_size": "--batch-size",
         "strength": "--strength", "metrics": "--metrics", "extractor": "--extractor",
         "inception_weights": "--inception-weights PATH", "reference_steps": "--reference-steps", "timesteps": "--t",
         "samplers": "--samplers", "nfe": "--nfe"}


def sampling_request(args, n: Optional[int] = None, **fields) -> SamplingRequest:
    """The request the sampling options of ``args`` make (None where an option is not given)."""
    options = {"eta": getattr(args, "eta", None), "variance": getattr(args, "variance", None),
               "threshold": getattr(args, "threshold", None)}
    return SamplingRequest(sampler=args.sampler, steps=args.steps, step_schedule=args.timesteps, options=options,
                           label=getattr(args, "label", None), guidance=getattr(args, "guidance", None),
                           seed=args.seed, n=args.n if n is None else n, **fields)


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
