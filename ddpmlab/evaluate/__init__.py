"""Trustworthy sample-quality evaluation: FID/KID/IS/precision-recall, 2-D distances, caching.

* :mod:`.features` - extractors locked in eval mode (the shipped MNIST classifier, or the
  FID Inception-v3 from a local weights file) and batched feature extraction;
* :mod:`.metrics` - FID, KID and IS by torchmetrics on all samples, precision/recall;
* :mod:`.reference` - reference statistics cached by dataset content and extractor;
* :mod:`.toy` - sliced Wasserstein distance and MMD for 2-D runs;
* :mod:`.run` - the metric registry, ``evaluate_run`` (``ddpm eval``) and the JSON results;
* :mod:`.nll` - the variational bound in bits/dim on held-out data (``ddpm eval --metrics nll``);
* :mod:`.classifier` - the shipped MNIST classifier;
* :mod:`.judges` - measures that can say "bad": the digit judge with a reject class (honest
  confident share), the clean-background and rough shares;
* :mod:`.bench` - sampler error against NFE (``ddpm bench samplers``);
* :mod:`.log` - the evaluation log a run writes during training (RUN/eval.csv).
"""

from ddpmlab.evaluate.features import (
    EXTRACTORS,
    Extractor,
    build_extractor,
    classifier_extractor,
    extract,
    inception_extractor,
)
from ddpmlab.evaluate.judges import clean_share, honest_confident_share, load_digit_judge, rough_share
from ddpmlab.evaluate.metrics import feature_sums, fid, inception_score, kid, precision_recall
from ddpmlab.evaluate.reference import default_cache_dir, reference_statistics
from ddpmlab.evaluate.run import (
    METRICS,
    EvalContext,
    EvalSettings,
    evaluate_model,
    evaluate_run,
    format_results,
    register_metric,
)
from ddpmlab.evaluate.toy import mmd_rbf, sliced_wasserstein

__all__ = [
    "EXTRACTORS", "Extractor", "build_extractor", "classifier_extractor", "inception_extractor", "extract",
    "feature_sums", "fid", "kid", "inception_score", "precision_recall", "default_cache_dir",
    "reference_statistics", "METRICS", "EvalContext", "EvalSettings", "evaluate_model", "evaluate_run",
    "format_results", "register_metric", "mmd_rbf", "sliced_wasserstein", "clean_share", "honest_confident_share",
    "load_digit_judge", "rough_share",
]
