"""The Ray Serve application: HTTP ingress, the search pipeline (an arm), the embedder."""
