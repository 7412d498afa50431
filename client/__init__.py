"""FedFuse platform client: local DP-LoRA training and the Flower ClientApp."""
