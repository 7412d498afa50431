"""FedFuse server: aggregation and the Flower ServerApp."""
