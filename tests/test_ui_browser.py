"""The operator's view in a real browser: headless Chromium opens the Prefect UI's run form of
generate-dataset/local (the short parameters come first), the flow run page and the run's summary artifact.
Screenshots are written under the test's temporary folder (not committed). Skipped where no Chromium is
installed (Debian: `apt-get install chromium`)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from test_runform import SHORT, short_form_run  # noqa: F401 - the deployment run, shared with test_runform

CHROMIUM = next(
    (path for name in ("chromium", "chromium-browser", "google-chrome", "chrome") if (path := shutil.which(name))), None
)
pytestmark = pytest.mark.slow


def _page(url: str, screenshot) -> str:
    """The page's DOM after its scripts ran, and a screenshot of it."""
    common = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=30000",
        "--window-size=1280,2400",
    ]
    subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=300, check=True)
    return subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=300, check=True).stdout


def test_the_run_form_run_page_and_summary_in_a_browser(short_form_run):  # noqa: F811
    if CHROMIUM is None:
        pytest.skip("no headless Chromium on this machine (apt-get install chromium)")
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    run = short_form_run
    with temporary_settings({PREFECT_API_URL: run.env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        deployment = client.read_deployment(run.run.deployment_id)
    shots = run.tmp / "screenshots"
    shots.mkdir(exist_ok=True)

    form = _page(f"{run.ui}/deployments/deployment/{deployment.id}/run", shots / "run-form.png")
    positions = [form.find(name) for name in SHORT]
    assert all(p >= 0 for p in positions), dict(zip(SHORT, positions))
    assert positions == sorted(positions), "the short parameters come first, in order"
    assert form.find("config_file") < form.rfind("config"), "the full configuration comes last"

    page = _page(f"{run.ui}/runs/flow-run/{run.run.id}", shots / "flow-run.png")
    assert run.run.name in page and "Completed" in page

    summary = next(a for a in run.artifacts if a.key == "short-form-summary")
    shown = _page(f"{run.ui}/artifacts/artifact/{summary.id}", shots / "summary.png")
    for field in ("Labels:", "Evaluation:", "Throughput:", "model card", "Contact sheet"):
        assert field in shown, field
    assert all((shots / name).stat().st_size > 10_000 for name in ("run-form.png", "flow-run.png", "summary.png"))
