"""Federated distillation on Flower: FedAvg, FedDF (server-side ensemble distillation) and FedMD-style
logit sharing. May import run, engine and below, never cli.

Importing this package does not import `flwr`; the Flower pieces live in
`distill.federated.strategies`, `.apps` and `.simulation`, imported when used.
"""

from distill.federated.config import FederatedRecipe, load_federated, parse_federated

__all__ = ["FederatedRecipe", "load_federated", "parse_federated"]
