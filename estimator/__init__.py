"""Learned operator-runtime predictors (XGBoost) and their fast tabulated form for the simulator.

Must never import torch: it runs on CPU laptops from the shipped data.
"""
