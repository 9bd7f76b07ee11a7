"""Trainers for the embedded models: the denoiser (``pagkit train``) and the classifier
(``pagkit train-classifier``)."""
