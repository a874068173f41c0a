"""Istio's istio-init: the iptables rules that send a pod's traffic through its sidecar.

| module | job |
|---|---|
| `rules.py` | sans-IO: options -> the `iptables-restore --noflush` text that installs, updates, removes |
| `iptables.py` | the shell: `iptables-save` in, `iptables-restore` out (v4 and v6) |
| `policy.py` | sans-IO: which new outbound connections go to the proxy, pass, or get refused |
| `decider.py` | the NFQUEUE shell around `policy.py`: config reload, the kernel fast path, counters |
| `cli.py` | `meshctl iptables` and `meshctl decider` |

Everything lives in chains of our own (Istio's names: ISTIO_INBOUND, ISTIO_IN_REDIRECT, ISTIO_OUTPUT,
ISTIO_REDIRECT in nat; with `--nfqueue` also ISTIO_DECIDE and ISTIO_KNOWN in mangle, ISTIO_DENY in
filter). The built-in chains hold only the jumps into them, so an update or a cleanup touches nothing
it did not install.
"""
