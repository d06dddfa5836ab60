"""Experiments: resumable runs, studies, the demo, model comparisons, curves, step benchmark."""
