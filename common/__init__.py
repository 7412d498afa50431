"""FedFuse core shared by server and clients: data, task, model, metrics, configuration."""
