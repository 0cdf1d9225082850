"""Training: one loop for every kind of training, each kind a task.

* :mod:`.loop` - the loop (Accelerate, run folder and lock, signals, logging, checkpoint and resume,
  budget, EMA, the non-finite guard, progress, sample drawings and evaluation) and :class:`.loop.Task`;
* :mod:`.tasks` - the kinds of training: :mod:`.tasks.diffusion` (``ddpm train``),
  :mod:`.tasks.autoencoder` (``ddpm train-autoencoder``), :mod:`.tasks.distill` (``ddpm distill``);
* :mod:`.run_folder` - a run's folder: create, log, trim on resume, resume its config;
* :mod:`.data` - a task's data: checked, described, encoded to latents, batched by training step;
* :mod:`.guard` - non-finite losses and gradients never reach the weights;
* :mod:`.lock` - one training process per run directory;
* :mod:`.distributed` - processes, micro-batches, mixed precision (Accelerate);
* :mod:`.budget` - the training steps that fit a wall-clock budget (train.minutes);
* :mod:`.monitor` - evaluation and TensorBoard during training;
* :mod:`.posthoc_ema` - power-function EMA profiles (Karras et al. 2024);
* :mod:`.precision` - which mixed precision this machine computes natively;
* :mod:`.allocator` - freed host memory kept in the process (CPU).
"""
