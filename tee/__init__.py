"""Protected inference: enclave process, sealing/attestation, transforms, untrusted accelerator, audit."""
