"""Linear probes on the teacher's hidden states: batched fitting, cross-fitting, layer choice, calibration."""
