"""`python -m dataplane.proxy`: the sidecar as pilot-agent starts it, without meshctl (the
operator's tool) and its imports; the same command as `meshctl proxy`."""

from dataplane.proxy.cli import proxy_command

if __name__ == "__main__":
    proxy_command()
