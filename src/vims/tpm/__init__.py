"""vTPM layer of VIMS.

The A-VM side (:mod:`vims.tpm.attester`, :mod:`vims.tpm.swtpm`) talks to a TPM
through tpm2-pytss; the REM-S side (:mod:`vims.tpm.verifier`,
:mod:`vims.tpm.eventlog`) is pure Python so that the verifier does not need the
TSS libraries and its parsing of untrusted evidence stays small and auditable.
"""
