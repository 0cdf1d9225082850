"""Training (Ho et al. 2020, Algorithm 1) and what keeps it safe.

* :mod:`.loop` - ``train(cfg)``: set-up, one ``train_step`` per optimizer step, logging and saving;
* :mod:`.guard` - non-finite losses and gradients never reach the weights;
* :mod:`.lock` - one training process per run directory;
* :mod:`.distributed` - processes, micro-batches, mixed precision (Accelerate);
* :mod:`.monitor` - evaluation and TensorBoard during training;
* :mod:`.allocator` - freed host memory kept in the process (CPU).
"""
