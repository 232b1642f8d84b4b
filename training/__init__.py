"""Runnable entry points: federated training, export, offline evaluation."""
