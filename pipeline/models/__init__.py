"""One LightningModule per RNN topology (and the char LM), all on GateLSTM, over a shared base."""
