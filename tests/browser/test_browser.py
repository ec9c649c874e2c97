"""Real-browser checks: JupyterLab and the HTML report in headless Chromium.

Debian's `chromium` is driven by Playwright (`executable_path`; no browser is ever
downloaded). JupyterLab listens on 127.0.0.1 only, with a random token, and the
browser refuses every request that is not to the loopback interface or a local
file, so the tests also prove that nothing loads from a CDN.

Flow:
1. make sure the small run exists (EMLOC_SMALL=1 in EMLOC_RUN_DIR, default runs/ci-small;
   `make test` has built it by now, so this resumes in seconds);
2. write the HTML report with `emloc report` and open it via file://: every plotly
   figure in it must render;
3. start JupyterLab at the repository root, open notebooks/00_quickstart.ipynb, run all
   cells (the kernel inherits EMLOC_SMALL and EMLOC_RUN_DIR), and wait for the
   results table, the dashboard's widget views and its plotly figures.

4. open a scratch notebook with the 2-D toy of the correction and run it.

Screenshots and timings go to artifacts/browser/. With EMLOC_UPDATE_SCREENSHOT=1 the
README's pictures are also copied to docs/ (`PICTURES`): the run dashboard, the
block × projection heatmap of kept energy, the correction view with its clamp slider,
and the 2-D toy. `make docs` does that on the demo run (runs/demo).
Without chromium the tests skip, unless EMLOC_REQUIRE_BROWSER=1 (CI), where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "browser"
NOTEBOOK = "notebooks/00_quickstart.ipynb"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}
SERVER_START_S = 180  # JupyterLab up and answering
LAB_LOAD_S = 180  # the lab page, the notebook and its kernel ready
RUN_ALL_S = 1200  # every quickstart cell (seconds when the run exists; a from-scratch run takes minutes)
RENDER_S = 120  # widget views and figures in the DOM once the cells have run
TAB_BUILD_S = 400  # a dashboard tab is built in the kernel when first opened (eigen-decompositions: slow on a busy CPU)
# The quickstart's run has every stage, so each of these dashboard tabs draws at least one figure;
# the other tabs (Results) hold only tables.
FIGURE_TABS = ["Spectra", "Rank plan", "Activations", "Drift", "Correction", "Training"]
TABLE_TABS = {"Results"}
TIMINGS: dict[str, float] = {}
# artifacts/browser/<name> -> docs/<name> under EMLOC_UPDATE_SCREENSHOT=1: the README's pictures
PICTURES = ["dashboard.png", "kept_energy.png", "correction.png", "toy.png"]
TOY_NOTEBOOK = "artifacts/browser/toy.ipynb"  # written by the test (artifacts/ is not committed)


# ----------------------------------------------------------------------------- helpers


def chromium_path() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record_timing(name: str, seconds: float) -> None:
    TIMINGS[name] = round(seconds, 1)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "timings.json").write_text(json.dumps(TIMINGS, indent=2) + "\n")


def page_text(page, limit: int = 6000) -> str:
    try:
        text = page.evaluate("() => document.body ? document.body.innerText : ''")
    except Exception as e:  # the page may be gone
        return f"(page text unavailable: {e})"
    text = re.sub(r"\n{3,}", "\n\n", text or "").strip()
    return text if len(text) <= limit else "…" + text[-limit:]


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Guard:
    """Aborts every browser request that is not to loopback or a local file, and remembers it."""

    def __init__(self):
        self.blocked: list[str] = []

    def __call__(self, route):
        url = route.request.url
        parsed = urlparse(url)
        if parsed.scheme in ("file", "data", "blob", "about") or (parsed.hostname or "") in LOOPBACK:
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    reason = None
    if path is None:
        reason = (
            "Debian's chromium is not installed (/usr/bin/chromium); install it with "
            "`apt-get install -y chromium` to run the browser tests"
        )
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright package is not installed (pip install -e '.[test]')"
    if reason:
        if os.environ.get("EMLOC_REQUIRE_BROWSER", "") not in ("", "0"):
            pytest.fail(reason + " (EMLOC_REQUIRE_BROWSER=1 makes this a failure)")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def small_run():
    """The run the notebooks share (EMLOC_RUN_DIR, default the small runs/ci-small); finished here if needed.

    A run directory that already holds a run keeps its settings: `make docs` points this at the demo run.
    """
    from emloc_nb.config import RunConfig, small_settings
    from emloc_nb.layout import LAYOUT
    from emloc_nb.run import Run

    run_dir = Path(os.environ.get("EMLOC_RUN_DIR") or REPO / "runs" / "ci-small").expanduser().resolve()
    started = time.time()
    run = Run(run_dir) if (run_dir / LAYOUT["config"]).is_file() else Run(run_dir, small_settings(RunConfig()))
    run.run_all()
    record_timing("ensure_small_run_s", time.time() - started)
    return run


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    """A headless Chromium context with a fresh profile, confined to loopback and local files."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    guard = Guard()
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1500, "height": 1000},
            device_scale_factor=1,
            accept_downloads=False,
        )
        try:
            context.set_default_timeout(60_000)
            context.set_default_navigation_timeout(120_000)
            context.route("**/*", guard)
            yield SimpleNamespace(context=context, guard=guard)
        finally:
            context.close()


@pytest.fixture(scope="module")
def jupyter_lab(small_run, tmp_path_factory):
    """JupyterLab on 127.0.0.1 (random port and token), root = the repository; always stopped."""
    home = tmp_path_factory.mktemp("jupyter")
    config_dir, settings_dir = home / "config", home / "lab-settings"
    config_dir.mkdir()
    # No news feed, no update check, no PyPI extension manager, no language servers (which write
    # .virtual_documents into the root): the server makes no outside request and writes nothing in the repo.
    (config_dir / "jupyter_server_config.json").write_text(
        json.dumps(
            {
                "ServerApp": {"jpserver_extensions": {"jupyter_lsp": False}},
                "LabApp": {
                    "news_url": None,
                    "extension_manager": "readonly",
                    "expose_app_in_browser": True,
                    "check_for_updates_class": "jupyterlab.handlers.announcements.NeverCheckForUpdate",
                },
            }
        )
    )
    # Never autosave (the committed notebook must stay without outputs), ask nothing about news,
    # and attach every cell to the DOM so the dashboard at the bottom is rendered.
    for plugin, values in {
        "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    }.items():
        target = settings_dir / f"{plugin}.jupyterlab-settings"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(values))

    from emloc_nb.config import RunConfig, small_settings

    small = small_run.config.to_dict() == small_settings(RunConfig()).to_dict()
    env = {
        **os.environ,
        "EMLOC_SMALL": "1" if small else "0",  # the kernel's notebook_run() must build the same config
        "EMLOC_RUN_DIR": str(small_run.dir),
        "PYTHONUNBUFFERED": "1",
        "JUPYTER_CONFIG_DIR": str(config_dir),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings_dir),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "IPYTHONDIR": str(home / "ipython"),
    }
    port, token = free_port(), secrets.token_hex(24)
    log = home / "server.log"
    notebook_file = REPO / NOTEBOOK
    committed = notebook_file.read_bytes()
    checkpoints = notebook_file.parent / ".ipynb_checkpoints"
    had_checkpoints = checkpoints.exists()
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={REPO}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers run as root
    started = time.time()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {proc.returncode} while starting:\n{tail(log)}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.time() > deadline:
                pytest.fail(f"JupyterLab did not answer on {base} within {SERVER_START_S} s:\n{tail(log)}")
            time.sleep(0.5)
        record_timing("jupyterlab_start_s", time.time() - started)
        yield {"base": base, "token": token, "log": log}
    finally:
        _stop(proc, base, token)
        if notebook_file.read_bytes() != committed:  # belt and braces: autosave is off
            notebook_file.write_bytes(committed)
            warnings.warn(f"JupyterLab modified {NOTEBOOK}; the committed version was restored.", stacklevel=2)
        if not had_checkpoints and checkpoints.is_dir():
            shutil.rmtree(checkpoints, ignore_errors=True)


def _stop(proc: subprocess.Popen, base: str, token: str) -> None:
    """Shut the kernels down through the API, then stop the server (and only the processes it started)."""
    if proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/api/kernels?token={token}", timeout=5) as r:
                kernels = json.load(r)
            for k in kernels:
                req = urllib.request.Request(f"{base}/api/kernels/{k['id']}?token={token}", method="DELETE")
                urllib.request.urlopen(req, timeout=15).close()
        except Exception:
            pass
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the server's own process group (start_new_session)
            proc.wait(timeout=10)


# ----------------------------------------------------------------------------- the HTML report


def test_html_report_renders_offline(browser, small_run):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    report = ARTIFACTS / "report.html"
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "emloc_nb.cli", "report", "--run-dir", str(small_run.dir), "--output", str(report)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"`emloc report` failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    html = report.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]+src=[\"']https?://", html), "the report loads a script from the network"
    expected = len(re.findall(r'class="plotly-graph-div"', html))
    assert expected > 0, "the report holds no plotly figure"
    record_timing("report_write_s", time.time() - started)

    page = browser.context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    started = time.time()
    try:
        page.goto(report.as_uri(), wait_until="load")
        try:
            page.wait_for_function(
                "n => document.querySelectorAll('.js-plotly-plot .main-svg').length >= n && "
                "[...document.querySelectorAll('.plotly-graph-div')].every(d => d.querySelector('.main-svg'))",
                arg=expected,
                timeout=RENDER_S * 1000,
            )
        except Exception:
            rendered = page.evaluate("() => document.querySelectorAll('.js-plotly-plot').length")
            pytest.fail(
                f"{rendered} of the report's {expected} plotly figures rendered within {RENDER_S} s. "
                f"Page errors: {errors}\nPage text:\n{page_text(page)}"
            )
        rendered = page.evaluate("() => document.querySelectorAll('.js-plotly-plot').length")
        assert rendered == expected, f"{rendered} plotly figures rendered, the report holds {expected}"
        assert not errors, f"JavaScript errors in the report: {errors}"
        assert not browser.guard.blocked, f"the report tried to reach the network: {browser.guard.blocked}"
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        record_timing("report_render_s", time.time() - started)
    finally:
        page.close()


# ----------------------------------------------------------------------------- the quickstart in JupyterLab

OPEN_NOTEBOOK_JS = """
async (path) => {
  const app = window.jupyterapp;
  if (!app) { throw new Error('window.jupyterapp is missing (LabApp.expose_app_in_browser)'); }
  await app.restored;
  for (let i = 0; i < 1200; i++) {
    for (const w of app.shell.widgets('main')) {
      if (w.context && w.context.path === path && w.sessionContext) {
        await w.context.ready;
        await w.sessionContext.ready;
        app.shell.activateById(w.id);
        const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
        return kernel ? kernel.name : null;
      }
    }
    await new Promise(r => setTimeout(r, 100));
  }
  throw new Error('JupyterLab did not open ' + path);
}
"""

PROGRESS_JS = """
(path) => {
  const w = [...window.jupyterapp.shell.widgets('main')].find(w => w.context && w.context.path === path);
  const cells = w.content.widgets.filter(c => c.model.type === 'code');
  const errors = [];
  for (const c of cells) {
    for (const o of c.model.outputs.toJSON()) {
      if (o.output_type === 'error') { errors.push(o.ename + ': ' + o.evalue); }
    }
  }
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  return {cells: cells.length, executed: cells.filter(c => c.model.executionCount !== null).length,
          pending: cells.filter(c => (c.promptNode ? c.promptNode.textContent : '').includes('*')).length,
          status: kernel ? kernel.status : 'no kernel', errors: errors};
}
"""


KERNEL_STATUS_JS = """
(path) => {
  const w = [...window.jupyterapp.shell.widgets('main')].find(w => w.context && w.context.path === path);
  const kernel = w && w.sessionContext.session && w.sessionContext.session.kernel;
  return kernel ? kernel.status : 'no kernel';
}
"""


def wait_for_idle_kernel(page, timeout_s: float) -> bool:
    """True once the notebook's kernel has been idle for three polls in a row."""
    deadline, idle = time.time() + timeout_s, 0
    while time.time() < deadline:
        idle = idle + 1 if page.evaluate(KERNEL_STATUS_JS, NOTEBOOK) == "idle" else 0
        if idle >= 3:
            return True
        time.sleep(0.5)
    return False


def test_quickstart_runs_and_renders_in_jupyterlab(browser, jupyter_lab):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    started = time.time()
    try:
        page.goto(
            f"{jupyter_lab['base']}/lab/tree/{NOTEBOOK}?token={jupyter_lab['token']}", wait_until="domcontentloaded"
        )
        try:
            page.wait_for_function("() => window.jupyterapp !== undefined", timeout=LAB_LOAD_S * 1000)
            kernel = page.evaluate(OPEN_NOTEBOOK_JS, NOTEBOOK)
        except Exception as e:
            pytest.fail(
                f"JupyterLab did not open {NOTEBOOK} with a kernel: {e}\nPage text:\n{page_text(page)}\n"
                f"Server log:\n{tail(jupyter_lab['log'])}"
            )
        assert kernel == "python3", f"the notebook started kernel {kernel!r}, expected python3"
        record_timing("lab_open_notebook_s", time.time() - started)

        started = time.time()
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); return true; }")
        deadline, state = time.time() + RUN_ALL_S, {}
        while time.time() < deadline:
            state = page.evaluate(PROGRESS_JS, NOTEBOOK)
            if state["errors"]:
                pytest.fail(f"A cell of {NOTEBOOK} raised {state['errors']}\nPage text:\n{page_text(page)}")
            if state["executed"] == state["cells"] and not state["pending"] and state["status"] == "idle":
                break
            time.sleep(2)
        else:
            pytest.fail(
                f"{NOTEBOOK} did not finish within {RUN_ALL_S} s ({state}).\nPage text:\n{page_text(page)}\n"
                f"Server log:\n{tail(jupyter_lab['log'])}"
            )
        record_timing("lab_run_all_s", time.time() - started)

        started = time.time()
        for what, selector in (
            ("the results table", ".jp-OutputArea-output table.dataframe"),
            ("the dashboard's widget view", ".jp-OutputArea-output .jupyter-widgets .widget-tab"),
        ):
            try:
                page.wait_for_selector(selector, state="visible", timeout=RENDER_S * 1000)
            except Exception as e:
                pytest.fail(
                    f"{what} ({selector}) did not render within {RENDER_S} s ({type(e).__name__}). "
                    f"Page errors: {errors}\nPage text:\n{page_text(page)}"
                )
        text = page_text(page, limit=10**6)
        for problem in ("Error displaying widget", "Model not found", "No version of module"):
            assert problem not in text, f"a widget failed to render ({problem!r}):\n{page_text(page)}"

        # Visit every dashboard tab, so that each tab's figures render, and count them.
        dashboard = page.locator(".jp-OutputArea-output:has(.widget-tab)").last
        tabs = dashboard.locator(".widget-tab > .lm-TabBar .lm-TabBar-tab")
        titles = [t.strip() for t in tabs.all_inner_texts()]
        assert titles, f"the dashboard shows no tabs:\n{page_text(page)}"
        page.set_viewport_size({"width": 1500, "height": 2200})  # room for a whole tab in the screenshots
        plots: dict[str, int] = {}
        failed: dict[str, str] = {}
        visible = (
            "() => [...document.querySelectorAll('.widget-tab .js-plotly-plot')]"
            ".filter(p => p.querySelector('.main-svg') && p.getBoundingClientRect().width > 0).length"
        )
        for i, title in enumerate(titles):
            tabs.nth(i).click()
            # A tab is built in the kernel the first time it is opened: wait for the kernel, then for its figures.
            page.wait_for_timeout(500)
            if not wait_for_idle_kernel(page, TAB_BUILD_S):
                pytest.fail(f"the kernel stayed busy for {TAB_BUILD_S} s after opening the dashboard tab {title!r}")
            with contextlib.suppress(Exception):  # a tab without figures is reported below, with every tab's count
                page.wait_for_function(visible + " > 0", timeout=(10 if title in TABLE_TABS else RENDER_S) * 1000)
            plots[title] = page.evaluate(visible)
            # Only the open tab is in innerText, so look for the Dashboard's "<title> failed: <error>" note now.
            text = page_text(page, limit=10**6)
            if f"{title} failed:" in text:
                failed[title] = text[text.index(f"{title} failed:") :][:500]
            dashboard.screenshot(path=str(ARTIFACTS / f"dashboard-tab{i}.png"))
        assert not failed, f"dashboard tabs failed to build: {failed}"
        assert sum(plots.values()) > 0, (
            f"no plotly figure rendered in any dashboard tab: {plots}. "
            f"Page errors: {errors}\nPage text:\n{page_text(page)}"
        )
        assert set(FIGURE_TABS) <= set(titles), f"the dashboard lacks tabs {set(FIGURE_TABS) - set(titles)}: {titles}"
        blank = [t for t in FIGURE_TABS if plots[t] == 0]
        assert not blank, (
            f"dashboard tabs {blank} drew no plotly figure (figures per tab: {plots}). "
            f"Page errors: {errors}\nPage text:\n{page_text(page)}"
        )
        assert page.locator(".jupyter-widgets").count() > 0
        assert not browser.guard.blocked, f"JupyterLab tried to reach the network: {browser.guard.blocked}"
        record_timing("lab_render_s", time.time() - started)
        (ARTIFACTS / "dashboard_tabs.json").write_text(json.dumps(plots, indent=2) + "\n")

        # The README's pictures: the dashboard on its results, the kept-energy heatmap, the correction view.
        show_tab(page, tabs, titles.index("Results"))
        dashboard.scroll_into_view_if_needed()
        dashboard.screenshot(path=str(ARTIFACTS / "dashboard.png"))
        show_tab(page, tabs, titles.index("Spectra"))
        heatmap = dashboard.locator(".js-plotly-plot:visible", has_text="Whitened energy kept")
        assert heatmap.count() == 1, "the Spectra tab shows no kept-energy heatmap"
        heatmap.scroll_into_view_if_needed()
        heatmap.screenshot(path=str(ARTIFACTS / "kept_energy.png"))
        show_tab(page, tabs, titles.index("Correction"))
        assert dashboard.locator(".widget-slider:visible").count() > 0, "the correction view shows no clamp slider"
        dashboard.screenshot(path=str(ARTIFACTS / "correction.png"))
        page.set_viewport_size({"width": 1500, "height": 1000})
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "quickstart.png"))
    finally:
        page.close()


def show_tab(page, tabs, index: int) -> None:
    tabs.nth(index).click()
    page.wait_for_timeout(1500)  # the tab was built when first visited; let its figures settle


def test_the_2d_toy_renders_in_jupyterlab(browser, jupyter_lab):
    """The correction as geometry: a scratch notebook with ToyCorrection(2), for the README's picture."""
    import nbformat

    notebook = REPO / TOY_NOTEBOOK
    notebook.parent.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from emloc_nb.widgets import ToyCorrection\n\nToyCorrection(2)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, notebook)
    page = browser.context.new_page()
    try:
        page.goto(
            f"{jupyter_lab['base']}/lab/tree/{TOY_NOTEBOOK}?token={jupyter_lab['token']}", wait_until="domcontentloaded"
        )
        page.wait_for_function("() => window.jupyterapp !== undefined", timeout=LAB_LOAD_S * 1000)
        page.evaluate(OPEN_NOTEBOOK_JS, TOY_NOTEBOOK)
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); return true; }")
        output = page.locator(".jp-OutputArea-output:has(.js-plotly-plot .main-svg)").last
        try:
            output.wait_for(state="visible", timeout=RENDER_S * 1000)
        except Exception:
            pytest.fail(f"the 2-D toy drew no figure within {RENDER_S} s.\nPage text:\n{page_text(page)}")
        assert output.locator(".widget-slider").count() > 0, "the toy shows no sliders"
        page.wait_for_timeout(1000)
        output.screenshot(path=str(ARTIFACTS / "toy.png"))
    finally:
        page.close()
    if os.environ.get("EMLOC_UPDATE_SCREENSHOT", "") not in ("", "0"):  # the toy runs last: all four exist now
        for name in PICTURES:
            shutil.copyfile(ARTIFACTS / name, REPO / "docs" / name)
