"""Built-in dataset manifests. The *.toml files beside this marker are the data; no code lives here."""
