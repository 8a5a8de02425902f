"""Trust at the point of care: calibrated probabilities, stated operating points, an out-of-distribution score
and the model card, all fitted on validation data (the OOD statistics on training data) at export time.

The fitting (:mod:`fedxr.trust.fit`) needs torch; what the edge runtime reads back is plain JSON in the ONNX
file's metadata plus one extra graph output (``ood_score``), so :mod:`fedxr.edge` stays torch-free.
"""
