"""Progress bars that stay readable in log files (few updates when stderr is not a terminal)."""

import sys

from tqdm.auto import tqdm


def progress_bar(enabled: bool = True, **kwargs) -> tqdm:
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if interactive else 30.0)
    kwargs.setdefault("dynamic_ncols", interactive)
    return tqdm(disable=not enabled, **kwargs)


class SampleBar:
    """A bar that counts samples, advancing within a batch as its steps go by.

    A batch of ``m`` samples denoised in ``levels`` steps moves the bar by m / levels per
    step, so the bar reads "37/64 samples" and its rate is samples per second.
    """

    def __init__(self, enabled: bool, n: int, levels: int, desc: str):
        self.levels = max(int(levels), 1)
        self.bar = progress_bar(enabled, total=n, desc=desc, unit="sample", leave=False,
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} samples "
                                           "[{elapsed}<{remaining}, {rate_fmt}]")
        self.batch = 0

    def start_batch(self, m: int) -> None:
        self.batch = m

    def step(self, *_) -> None:
        self.bar.update(self.batch / self.levels)

    def close(self) -> None:
        self.bar.close()
