"""`rsx eval`: the paper's protocol, few-shot baselines, metrics, perturbations, reports.

The optional ``[eval]`` extra (scikit-learn, matplotlib) is needed here and nowhere else.
"""
