"""enclave-only: every layer runs inside the enclave; the accelerator holds and sees nothing."""
from __future__ import annotations

from tee import program
from tee.modes import Mode


class EnclaveOnlySide:
    def __init__(self, enc):
        self.lin = program.plain_lin(enc.params)
        self.out_dims = {}

    def submitter(self, pad=None):
        return program.eager(self.lin)


class EnclaveOnly(Mode):
    name = "enclave-only"
    summary = "enclave-only (nothing leaves the enclave)"
    outsources = False

    def enclave(self, enc, sealed):
        return EnclaveOnlySide(enc)


MODE = EnclaveOnly()
