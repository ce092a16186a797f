"""The web UI in a real browser (headless Chromium through its WebDriver): the flow API
serving recorded records of the lab's kinds of traffic, the page's live table, service map,
sankeys and Node throughput, filters typed and clicked. Screenshots go to
out/ui-screenshots/ (the test's artefacts)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from antrea_flow.aggregator.api import FlowApi
from antrea_flow.aggregator.window import FlowWindow
from antrea_flow.ipfix.address import parse_address

webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (make setup)")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.needs("chromium", "chromedriver")

SCREENSHOTS = Path(__file__).resolve().parents[2] / "out" / "ui-screenshots"
UI = Path(__file__).resolve().parents[2] / "antrea_flow" / "aggregator" / "ui"
WAIT = 20.0


def flow(src, dst, *, port=8080, service="", ingress=None, egress=None, octets=1000,
         flow_type=2, at=None, sport=40000):  # fmt: skip
    """A record as the aggregator exports it: src/dst are (namespace, pod, ip, node) or an
    address; ingress/egress are (namespace, name, rule, action)."""
    now = at or time.time()

    def side(prefix, end):
        if isinstance(end, str):
            return {f"{prefix}IPv4Address": end}
        ns, pod, ip, node = end
        return {f"{prefix}PodNamespace": ns, f"{prefix}PodName": pod,
                f"{prefix}IPv4Address": ip, f"{prefix}NodeName": node,
                f"{prefix}PodLabels": json.dumps({"app": pod.rsplit("-", 1)[0]})}  # fmt: skip

    record = {
        "flowStartSeconds": int(now) - 5, "flowEndSeconds": int(now),
        "flowEndMilliseconds": int(now * 1000), "protocolIdentifier": 6,
        "sourceTransportPort": sport, "destinationTransportPort": port,
        "octetTotalCount": octets, "octetDeltaCount": octets, "packetDeltaCount": 10,
        "reverseOctetTotalCount": octets * 3, "reverseOctetDeltaCount": octets * 3,
        "reversePacketDeltaCount": 10, "flowType": flow_type,
        "destinationServicePortName": service,
        **side("source", src), **side("destination", dst),
    }  # fmt: skip
    for direction, rule in (("ingress", ingress), ("egress", egress)):
        if rule:
            ns, name, rule_name, action = rule
            record |= {f"{direction}NetworkPolicyNamespace": ns,
                       f"{direction}NetworkPolicyName": name,
                       f"{direction}NetworkPolicyRuleName": rule_name,
                       f"{direction}NetworkPolicyRuleAction": action}  # fmt: skip
    return record


CLIENT = ("frontend", "client-1", "10.10.1.2", "node-1")
WEB = ("backend", "web-1", "10.10.2.3", "node-2")
DB = ("backend", "db-0", "10.10.2.4", "node-2")
ALLOW_WEB = ("backend", "web-allow-frontend", "allow-http", 1)
REJECT_DB = ("", "acnp-db-guard", "reject-clients", 3)
ISOLATED = ("", "", "", 2)  # a K8s NetworkPolicy's isolation: Antrea names no rule


def recorded(at: float) -> list[dict]:
    records = []
    for i in range(6):
        records.append(flow(CLIENT, WEB, service="backend/web:http", ingress=ALLOW_WEB,
                            octets=50_000 + i, at=at - 60 + i * 10, sport=41000 + i))  # fmt: skip
    records.append(flow(CLIENT, DB, ingress=REJECT_DB, octets=60, at=at - 20, sport=42000))
    records.append(flow(WEB, DB, ingress=ISOLATED, octets=800, at=at - 15, sport=43000))
    records.append(flow(CLIENT, "192.168.77.254", port=80, flow_type=3, octets=400,
                        at=at - 10, sport=44000))  # fmt: skip
    return records


@pytest.fixture
def api():
    if not (UI / "vendor" / "echarts.min.js").exists():
        pytest.skip("the UI's library is not installed (make setup runs build/ui_assets.py)")
    window = FlowWindow(1000)
    server = FlowApi(parse_address("127.0.0.1:0", default_protocol="tcp", listen=True), window)
    server.start()
    try:
        for record in recorded(time.time()):
            window.append(record)
        window.published()
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1400,1100"):  # fmt: skip
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path="/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def shoot(driver, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def rows(driver) -> list[tuple[str, str]]:
    """(class, text) of each row of the flow table."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#flows tbody tr')]"
        ".map(r => [r.className, r.innerText])"
    )


def top(driver) -> str:
    """The text of the table's first (newest) row; "" while it is empty."""
    table = rows(driver)
    return table[0][1] if table else ""


def wait_for(driver, condition, what: str, name: str):
    try:
        return WebDriverWait(driver, WAIT).until(lambda d: condition(d))
    except TimeoutException:
        shoot(driver, f"failed-{name}")
        raise AssertionError(f"{what} within {WAIT}s (screenshot failed-{name}.png)") from None


def chart_option(driver) -> dict:
    return driver.execute_script(
        "const o = echarts.getInstanceByDom(document.getElementById('chart')).getOption();"
        "return {series: o.series.map(s => ({type: s.type,"
        " nodes: (s.data || []).map(n => n.id || n.name),"
        " edges: (s.edges || s.links || []).map(e => ({source: e.source, target: e.target,"
        "   color: e.lineStyle && e.lineStyle.color}))}))};"
    )


def open_ui(driver, api: FlowApi) -> None:
    driver.get(f"http://127.0.0.1:{api.port}/")
    wait_for(driver, lambda d: len(rows(d)) == 9, "the table shows the 9 recorded flows", "table")
    wait_for(driver, lambda d: d.execute_script("return document.body.dataset.chart") == "map",
             "the service map is drawn", "map")  # fmt: skip


def test_the_table_shows_the_denied_connection_with_its_policy(api, browser):
    open_ui(browser, api)
    shoot(browser, "flows-and-map")
    table = rows(browser)
    rejected = [text for kind, text in table if "REJECTED" in kind.split()]
    assert len(rejected) == 1
    assert "frontend/client-1:42000" in rejected[0] and "backend/db-0:8080" in rejected[0]
    assert "ingress acnp-db-guard rule reject-clients" in rejected[0]
    dropped = [text for kind, text in table if "DROPPED" in kind.split()]
    assert len(dropped) == 1 and "K8s NetworkPolicy default deny" in dropped[0]
    # Newest first: the external flow was the last one recorded.
    assert "192.168.77.254:80" in table[0][1]


def test_the_service_map_has_the_workloads_and_a_red_edge_for_denied_traffic(api, browser):
    open_ui(browser, api)
    (series,) = chart_option(browser)["series"]
    assert series["type"] == "graph"
    assert set(series["nodes"]) == {
        "frontend/client", "backend/web", "backend/db", "192.168.77.254"
    }  # fmt: skip
    colors = {(e["source"], e["target"]): e["color"] for e in series["edges"]}
    assert colors[("frontend/client", "backend/db")] == "#d62d20"  # rejected
    assert colors[("backend/web", "backend/db")] == "#d62d20"  # dropped
    assert colors[("frontend/client", "backend/web")] == "#2e9d57"


def test_a_filter_narrows_the_table_and_a_bad_one_is_named(api, browser):
    open_ui(browser, api)
    Select(browser.find_element(By.NAME, "verdict")).select_by_visible_text("REJECTED")
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    wait_for(browser, lambda d: len(rows(d)) == 1, "only the rejected flow is left", "filter")
    assert "REJECTED" in rows(browser)[0][0]
    shoot(browser, "filtered")
    port = browser.find_element(By.NAME, "port")
    port.send_keys("99999")
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    error = browser.find_element(By.ID, "filter-error")
    wait_for(browser, lambda d: "port" in error.text, "the bad port is named", "bad-filter")
    assert "99999" in error.text and "0-65535" in error.text


def test_clicking_a_workload_on_the_map_filters_the_table(api, browser):
    open_ui(browser, api)
    canvas = browser.find_element(By.CSS_SELECTOR, "#chart canvas")
    # Where ECharts drew backend/db: the graph's layout, converted to the canvas's pixels.
    x, y = browser.execute_script(
        "const chart = echarts.getInstanceByDom(document.getElementById('chart'));"
        "const data = chart.getModel().getSeriesByIndex(0).getData();"
        "const index = data.indexOfName('backend/db');"
        "return chart.convertToPixel({seriesIndex: 0}, data.getItemLayout(index));"
    )
    size = canvas.size
    webdriver.ActionChains(browser).move_to_element_with_offset(
        canvas, int(x - size["width"] / 2), int(y - size["height"] / 2)
    ).click().perform()
    wait_for(
        browser,
        lambda d: d.find_element(By.NAME, "pod").get_attribute("value") == "backend/db",
        "the clicked workload becomes the Pod filter",
        "click-node",
    )
    wait_for(browser, lambda d: len(rows(d)) == 2, "the table keeps backend/db's flows", "click")
    assert all("backend/db-0" in text for _, text in rows(browser))
    shoot(browser, "clicked-db")


def test_sankeys_and_node_throughput_are_drawn(api, browser):
    open_ui(browser, api)
    expected = {
        "sankey-pod": {"from frontend/client-1", "to backend/web-1", "to backend/db-0"},
        "sankey-service": {"from frontend/client-1", "to backend/web:http"},
        "sankey-policy": {"to backend/web-allow-frontend", "to acnp-db-guard"},
    }
    for view, names in expected.items():
        browser.find_element(By.CSS_SELECTOR, f"#tabs button[data-view={view}]").click()
        wait_for(browser, lambda d, v=view: d.execute_script("return document.body.dataset.chart")
                 == v, f"the {view} view is drawn", view)  # fmt: skip
        (series,) = chart_option(browser)["series"]
        assert series["type"] == "sankey"
        assert names <= set(series["nodes"]), (view, series["nodes"])
        shoot(browser, view)
    browser.find_element(By.CSS_SELECTOR, "#tabs button[data-view=throughput]").click()
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.chart")
             == "throughput", "the throughput view is drawn", "throughput")  # fmt: skip
    names = {s["name"] for s in browser.execute_script(
        "return echarts.getInstanceByDom(document.getElementById('chart')).getOption().series"
    )}  # fmt: skip
    assert names == {"node-1 tx", "node-1 rx", "node-2 tx", "node-2 rx"}
    shoot(browser, "throughput")


def test_new_flows_appear_live_and_pause_holds_them_back(api, browser):
    open_ui(browser, api)
    api.window.append(flow(CLIENT, WEB, ingress=ALLOW_WEB, octets=7, sport=45000))
    api.window.published()
    wait_for(browser, lambda d: ":45000" in top(d), "the new flow is on top", "live")
    browser.find_element(By.ID, "pause").click()
    assert browser.find_element(By.ID, "status").text == "paused"
    api.window.append(flow(CLIENT, WEB, ingress=ALLOW_WEB, octets=7, sport=45001))
    api.window.published()
    browser.find_element(By.ID, "pause").click()  # resume: the latest flows again
    wait_for(browser, lambda d: ":45001" in top(d), "resuming shows it", "resume")


def click_at(driver, x: float, y: float) -> None:
    """A real click at the chart canvas's pixel (x, y)."""
    canvas = driver.find_element(By.CSS_SELECTOR, "#chart canvas")
    size = canvas.size
    webdriver.ActionChains(driver).move_to_element_with_offset(
        canvas, int(x - size["width"] / 2), int(y - size["height"] / 2)
    ).click().perform()


def test_clicking_an_edge_filters_the_table_by_its_two_ends(api, browser):
    open_ui(browser, api)
    # The middle of the drawn curve from frontend/client to backend/db.
    x, y = browser.execute_script(
        "const chart = echarts.getInstanceByDom(document.getElementById('chart'));"
        "const edges = chart.getModel().getSeriesByIndex(0).getEdgeData();"
        "for (let i = 0; i < edges.count(); i++) {"
        "  const e = edges.getRawDataItem(i);"
        "  if (e.source !== 'frontend/client' || e.target !== 'backend/db') continue;"
        "  const line = edges.getItemGraphicEl(i).childOfName('line');"
        "  const s = line.shape;"
        "  return line.transformCoordToGlobal(0.25 * s.x1 + 0.5 * s.cpx1 + 0.25 * s.x2,"
        "                            0.25 * s.y1 + 0.5 * s.cpy1 + 0.25 * s.y2);"
        "}"
    )
    click_at(browser, x, y)
    more = browser.find_element(By.NAME, "more")
    ends = "from-pod=frontend/client to-pod=backend/db"
    wait_for(browser, lambda d: more.get_attribute("value") == ends, "the ends as filters", "edge")
    wait_for(browser, lambda d: len(rows(d)) == 1, "only the rejected flow is left", "edge-rows")
    assert "REJECTED" in rows(browser)[0][0]


def test_the_map_of_namespaces(api, browser):
    open_ui(browser, api)
    Select(browser.find_element(By.NAME, "map-by")).select_by_value("namespace")
    wait_for(
        browser,
        lambda d: (
            set(chart_option(d)["series"][0]["nodes"]) == {"frontend", "backend", "192.168.77.254"}
        ),
        "namespaces as the map's nodes",
        "map-namespaces",
    )
    shoot(browser, "map-namespaces")
