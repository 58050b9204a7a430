"""The metric names the evaluation side returns (shared by its tests)."""

CLASSIFICATION_KEYS = {"accuracy", "nll", "ece", "ece_adaptive", "mce", "brier"}
OOD_KEYS = {
    "ood_auroc_max_prob",
    "ood_fpr95_max_prob",
    "ood_auroc_entropy",
    "ood_fpr95_entropy",
}
REGRESSION_KEYS = {
    "nll",
    "rmse",
    "coverage_50",
    "coverage_90",
    "coverage_95",
    "calibration_error",
}
