"""The results of a run as they lie on disk: where each row's side files go. The pipeline writes them,
the reports read them; both import this package, which imports neither."""
