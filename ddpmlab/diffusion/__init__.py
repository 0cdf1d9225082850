"""The mathematics of diffusion, with no networks and no files.

* :mod:`.schedules` - beta schedules, NoiseSchedule (float64 tables), respacing, step selection;
* :mod:`.process` - q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0), eps / x0 / v / score;
* :mod:`.reverse` - p(x_{t-1} | x_t): the output split, fixed and learned variances, one ancestral step;
* :mod:`.objectives` - L_simple with eps / x0 / v targets, loss weightings, timestep sampling;
* :mod:`.likelihood` - KL terms, discretized decoder, the variational bound (bits/dim);
* :mod:`.analytic` - Gaussian mixtures with exact scores: the ground truth of the tests.
"""
