"""The Prefect flows of indusfactory (one module per stage) and the ``indusfactory`` command line."""

import os

# A temporary Prefect API that Prefect starts itself (a flow called from Python without PREFECT_API_URL) gets
# as long to start as the CLI's (flows.local_api); Prefect's default, 20 s, is missed on a loaded machine.
# Read when Prefect is first imported: set before.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
