"""Accuracy as a local `evaluate` metric module (evaluate 0.4.6 ships no metrics and we never download).

import evaluate, hf_fsf, pathlib
accuracy = evaluate.load(str(pathlib.Path(hf_fsf.__file__).parent / "metrics" / "accuracy"))
accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])  # {"accuracy": 0.666...}
"""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to their reference label (optionally weighted)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids (ints).
    references: true class ids (ints).
    normalize: if False, return the number (or total weight) of correct predictions instead of the fraction.
    sample_weight: optional per-example weights.
Returns:
    {"accuracy": float}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict:
        if len(predictions) != len(references):
            raise ValueError(
                f"accuracy: {len(predictions)} predictions but {len(references)} references; pass one each."
            )
        weights = [1.0] * len(predictions) if sample_weight is None else [float(w) for w in sample_weight]
        if len(weights) != len(predictions):
            raise ValueError("accuracy: sample_weight must have one weight per prediction.")
        correct = sum(w for p, r, w in zip(predictions, references, weights) if int(p) == int(r))
        if not normalize:
            return {"accuracy": float(correct)}
        total = sum(weights)
        return {"accuracy": float(correct / total) if total else float("nan")}
