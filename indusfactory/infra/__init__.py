"""Infrastructure under every stage: storage, locks, redaction, devices, failures, fingerprints, errors, images."""
