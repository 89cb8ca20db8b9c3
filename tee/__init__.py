"""Protected inference: linear layers outsourced, transformed and masked, to an untrusted accelerator;
non-linear layers, secrets and restoration in a simulated enclave.

What lives here: the bundle a model is protected into (`bundle`, `sealing`, `attestation`), the captured
program the enclave runs (`program`), the enclave and accelerator processes (`enclave`, `accelerator`,
`client`), the protection transforms (`shadownet`, `blinded` with its exact field GEMMs `fieldgemm`,
`fieldmath`, `fieldkernels`), INPUT handling for bundles (`inputs`) and the audit of what leaks (`audit`).

`tee` imports `base` and `edge`, never `mcu`; only `tools` imports it.
"""
