"""Train, inspect and ship recurrent networks: GateLSTM models on Lightning, DVC and MLflow."""
