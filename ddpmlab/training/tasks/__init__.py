"""The kinds of training, each a :class:`ddpmlab.training.loop.Task` on the one loop."""
