"""Citadel: the mesh's certificate authority (SPIFFE workload certificates over the bus).

| module | job |
|---|---|
| `identity.py` | sans-IO CSR checks: signature, key, exactly one SPIFFE URI SAN in our trust domain |
| `pki.py` | X.509: the self-signed root, Istio's plugged-in cacerts, workload leaves |
| `der.py` | just enough DER for the hot path (a leaf around precomputed parts; a CSR's key) |
| `authz.py` | node authorization: a node agent obtains only its own node's workload identities |
| `rotation.py` | sans-IO: which identities still hold an old-root certificate |
| `store.py` | the CA directory (0700/0600): the root across restarts, a rotation in progress |
| `ca.py` | sans-IO `CertificateAuthority`: sign, bundle, rotate, status; audit lines and metrics |
| `service.py` | the shell: RPC `sign` / `rotate_root` / `status`, `ca/bundle` on the publisher |
| `cli.py` | `meshctl citadel`, `meshctl ca rotate-root`, `meshctl ca status` |

PILOT_RPC.md describes the pilot RPC (`workloads`) that node authorization relies on.
"""
