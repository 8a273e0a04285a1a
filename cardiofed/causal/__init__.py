"""Federated causal attribution: did an intervention reduce risk? Propensity scores
estimated across hospitals; weighting and matching estimators, balance and sensitivity
computed from per-site aggregates only."""
