#!/usr/bin/env python3
"""The Grafana dashboard's PromQL, extracted and run.

    scripts/grafana-queries.py list [--function F] [--rate-interval R]
        every panel query of infra/grafana/sluice.json as a JSON array of
        {"panel", "ref_id", "expr"}, with $function and $__rate_interval replaced
    scripts/grafana-queries.py check
        the dashboard's queries equal infra/grafana/queries.json (what tests read), and each
        parses: promtool check rules over them (syntax only)
    scripts/grafana-queries.py run --prometheus URL --function F [--rate-interval R]
                                   [--require-data] [--time UNIX]
        each query against that Prometheus's HTTP API; prints one JSON line per query
        ({"panel", "ref_id", "series", "error"}) and exits 1 when any query errs (or, with
        --require-data, returns nothing). This is what an integration test that scrapes a
        real worker calls; the Prometheus must load infra/prometheus/alerts.yml as a rule
        file (panels read its recording rules).
    scripts/grafana-queries.py selftest [--prometheus-bin PATH]
        `run --require-data` against a Prometheus of its own (started here, on free loopback
        ports, rules loaded) scraping a synthetic exporter of the metrics contract's series:
        every query must evaluate and return data. No worker needed; the series' shape is the
        contract's, so a query that names a metric or label the contract does not have fails.

The last stdout line of check and selftest is a summary (`grafana: N queries ...`).
Standard library only; promtool and prometheus come from scripts/prometheus.sh.
"""

import argparse
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "infra/grafana/sluice.json"
QUERIES = ROOT / "infra/grafana/queries.json"
RULES = ROOT / "infra/prometheus/alerts.yml"


def extract(dashboard):
    """Every target with an expr, in panel order, rows' nested panels included (a collapsed
    row keeps its panels inside it)."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if "expr" in t:
                    out.append({"panel": p.get("title", ""), "ref_id": t.get("refId", ""), "expr": t["expr"]})
            walk(p.get("panels", []))

    walk(dashboard.get("panels", []))
    return out


def substitute(expr, function, rate_interval):
    for name, value in (("$__rate_interval", rate_interval), ("${function}", function), ("$function", function)):
        expr = expr.replace(name, value)
    if "$" in expr:
        raise SystemExit(f"grafana-queries: a variable left in: {expr}")
    return expr


def queries(function, rate_interval):
    d = json.loads(DASHBOARD.read_text())
    return [dict(q, expr=substitute(q["expr"], function, rate_interval)) for q in extract(d)]


def promtool():
    return subprocess.run(
        [str(ROOT / "scripts/prometheus.sh"), "path", "promtool"], check=True, capture_output=True, text=True
    ).stdout.strip()


def cmd_check(_args):
    d = json.loads(DASHBOARD.read_text())
    extracted = extract(d)
    listed = json.loads(QUERIES.read_text())["queries"]
    if [q["expr"] for q in extracted] != [q["expr"] for q in listed]:
        print("grafana-queries: infra/grafana/queries.json does not list the dashboard's queries "
              "(run: cargo run -p sluice-infra -- generate)", file=sys.stderr)
        return 1
    # Each query as a recording rule: promtool parses it (syntax, functions, types).
    lines = ["groups:", "- name: grafana", "  rules:"]
    for i, q in enumerate(extracted):
        lines.append(f"  - record: grafana_query_{i}")
        lines.append(f"    expr: {json.dumps(substitute(q['expr'], 'f', '1m'))}")
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        path = f.name
    try:
        r = subprocess.run([promtool(), "check", "rules", path], capture_output=True, text=True)
    finally:
        os.unlink(path)
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        return 1
    print(f"grafana: {len(extracted)} queries parse (promtool) and match infra/grafana/queries.json")
    return 0


def query(base, expr, at=None):
    params = {"query": expr}
    if at is not None:
        params["time"] = str(at)
    url = base.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as e:  # 400: a bad query, with Prometheus's reason
        body = json.load(e)
    if body.get("status") != "success":
        return None, body.get("error", "unknown error")
    if body.get("warnings"):
        return None, "; ".join(body["warnings"])
    return body["data"]["result"], None


def run(base, function, rate_interval, require_data, at=None):
    failed = 0
    qs = queries(function, rate_interval)
    for q in qs:
        result, error = query(base, q["expr"], at)
        series = len(result) if result is not None else 0
        if error is None and require_data and series == 0:
            error = "no data"
        if error:
            failed += 1
        print(json.dumps({"panel": q["panel"], "ref_id": q["ref_id"], "series": series, "error": error, "expr": q["expr"]}))
    return len(qs), failed


def cmd_run(args):
    n, failed = run(args.prometheus, args.function, args.rate_interval, args.require_data, args.time)
    print(f"grafana: {n - failed} of {n} queries answered" + (" with data" if args.require_data else ""))
    return 1 if failed else 0


class Exporter:
    """The metrics contract's series for two functions, growing at every scrape: all
    outcomes and error classes, the three histograms, every gauge, sluice_build_info."""

    def __init__(self):
        self.n = 0
        self.lock = threading.Lock()

    def text(self):
        with self.lock:
            self.n += 1
            n = self.n
        out = []
        # Two versions of each function: a stable one and a canary (Argo Rollouts' analysis
        # compares them by this label).
        for fn, version in (
            ("charge-payment", "1.2.0"),
            ("charge-payment", "1.3.0"),
            ("deliver-webhook", "1.2.0"),
            ("deliver-webhook", "1.3.0"),
            ("order-steps", "1.2.0"),
            ("order-steps", "1.3.0"),
        ):
            base = f'function="{fn}",queue="{fn}",version="{version}"'
            for outcome, cls, per in (
                ("succeeded", "none", 50),
                ("duplicate", "none", 2),
                ("retried", "transient", 3),
                ("retried", "retry_after", 1),
                ("dead_lettered", "permanent", 1),
                ("dead_lettered", "transient", 1),
                ("dead_lettered", "crash_loop", 1),
                ("released", "none", 1),
            ):
                out.append(f'sluice_messages_total{{{base},outcome="{outcome}",error_class="{cls}"}} {per * n}')
            out.append(f"sluice_received_total{{{base}}} {60 * n}")
            out.append(f"sluice_panics_total{{{base}}} {n}")
            out.append(f"sluice_immediate_retries_total{{{base}}} {2 * n}")
            for metric in ("handler_duration", "process_duration", "message_age"):
                cumulative = 0
                for le, per in (("0.05", 20), ("0.1", 15), ("0.2", 10), ("0.5", 10), ("1", 4), ("+Inf", 1)):
                    cumulative += per
                    out.append(f'sluice_{metric}_seconds_bucket{{{base},le="{le}"}} {cumulative * n}')
                out.append(f"sluice_{metric}_seconds_sum{{{base}}} {9.5 * n}")
                out.append(f"sluice_{metric}_seconds_count{{{base}}} {cumulative * n}")
            out.append(f"sluice_in_flight{{{base}}} 3")
            out.append(f"sluice_breaker_state{{{base}}} 0")
            out.append(f"sluice_ready{{{base}}} 1")
            for state, v in (("ready", 40), ("in_flight", 3), ("delayed", 5), ("dead_lettered", 2)):
                out.append(f'sluice_queue_messages{{{base},state="{state}"}} {v}')
            out.append(f"sluice_queue_oldest_age_seconds{{{base}}} {1.5 * n}")
            out.append(f'sluice_build_info{{{base},sluice_version="0.1.0"}} 1')
        return "\n".join(out) + "\n"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cmd_selftest(args):
    # A SIGTERM (the caller's cleanup) must still stop the Prometheus started here: turn it
    # into SystemExit so that the `finally` below runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    exporter = Exporter()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = exporter.text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    work = tempfile.mkdtemp(prefix="grafana-selftest-")
    port = free_port()
    config = pathlib.Path(work) / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {json.dumps(str(RULES))}\n"
        "scrape_configs:\n  - job_name: synthetic\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.server_address[1]}']\n"
    )
    binary = args.prometheus_bin or subprocess.run(
        [str(ROOT / "scripts/prometheus.sh"), "path", "prometheus"], check=True, capture_output=True, text=True
    ).stdout.strip()
    log = open(pathlib.Path(work) / "prometheus.log", "w")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={work}/data",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        # Ready once the rules have been evaluated over a few scrapes: the slowest window
        # needs two samples, the recording rules one evaluation after that.
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                sys.stderr.write((pathlib.Path(work) / "prometheus.log").read_text())
                print("grafana-queries: prometheus exited", file=sys.stderr)
                return 1
            try:
                result, _ = query(base, "sluice:slo_errors:ratio_rate3d and sluice:process_duration_seconds:p95_rate5m")
                if result:
                    samples, _ = query(base, "count_over_time(sluice_received_total[10s])")
                    if samples and min(float(s["value"][1]) for s in samples) >= 4:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                print("grafana-queries: no rule results within 60 s", file=sys.stderr)
                return 1
            time.sleep(0.25)
        # $__rate_interval: 10 s spans several 1 s scrapes, as Grafana's 4 x scrape interval.
        n, failed = run(base, "charge-payment", "10s", require_data=True)
        analysed, analysis_failed = run_analysis(base)
        failed += analysis_failed
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        server.shutdown()
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"analysis: {analysed - analysis_failed} of {analysed} AnalysisTemplate queries answered one number")
    print(f"grafana: {n - failed + analysis_failed} of {n} queries answered with data on a real Prometheus (synthetic contract series)")
    return 1 if failed else 0


def run_analysis(base):
    """The Argo Rollouts AnalysisTemplates' queries (infra/k8s/*/rollout-*/), with the canary
    as version 1.3.0 and the stable version as 1.2.0: each must answer exactly one finite
    number, as the analysis reads `result[0]`. Needs PyYAML (the project venv has it, with
    cfn-lint); without it they are skipped, and said so."""
    try:
        import yaml
    except ImportError:
        print("grafana-queries: PyYAML missing: AnalysisTemplate queries not run", file=sys.stderr)
        return 0, 0
    n = failed = 0
    for path in sorted(ROOT.glob("infra/k8s/*/rollout-*/analysistemplate.yaml")):
        doc = yaml.safe_load(path.read_text())
        for m in doc["spec"]["metrics"]:
            expr = m["provider"]["prometheus"]["query"]
            expr = expr.replace("{{args.canary-hash}}", "1.3.0").replace("{{args.stable-hash}}", "1.2.0")
            n += 1
            result, error = query(base, expr)
            if error is None:
                values = [float(r["value"][1]) for r in result]
                if len(values) != 1 or values[0] != values[0] or values[0] in (float("inf"), float("-inf")):
                    error = f"expected one finite number, got {values}"
            if error:
                failed += 1
            print(json.dumps({"analysis": str(path.relative_to(ROOT)), "metric": m["name"],
                              "result": None if error else values[0], "error": error}))
    return n, failed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list")
    p.add_argument("--function", default="$function")
    p.add_argument("--rate-interval", default="$__rate_interval")
    sub.add_parser("check")
    p = sub.add_parser("run")
    p.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9091")
    p.add_argument("--function", required=True)
    p.add_argument("--rate-interval", default="1m")
    p.add_argument("--require-data", action="store_true")
    p.add_argument("--time", type=float, help="evaluation time (Unix seconds); default now")
    p = sub.add_parser("selftest")
    p.add_argument("--prometheus-bin")
    args = ap.parse_args()
    if args.cmd == "list":
        d = json.loads(DASHBOARD.read_text())
        out = [dict(q, expr=q["expr"].replace("$__rate_interval", args.rate_interval).replace("$function", args.function))
               for q in extract(d)]
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    return {"check": cmd_check, "run": cmd_run, "selftest": cmd_selftest}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
