"""Data: records (schema) → audio → manifests and datasets → tokens → dataset → collators → sampling."""
