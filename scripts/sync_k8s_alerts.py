"""Copy the alert rules of deploy/prometheus/alerts.yml into the Kubernetes PrometheusRule.

deploy/prometheus/alerts.yml is the one source (promtool checks and unit-tests it); the PrometheusRule in
deploy/k8s/base/monitoring.yaml carries the same groups. tests/deploy/test_consistency.py checks they agree.
Run: .venv/bin/python scripts/sync_k8s_alerts.py
"""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
MONITORING = ROOT / "deploy" / "k8s" / "base" / "monitoring.yaml"
HEADER = """# Generated from deploy/prometheus/alerts.yml by scripts/sync_k8s_alerts.py: edit that file, then run this.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: convray
spec:
"""


def _block_strings(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    """Multi-line strings (PromQL, descriptions) as readable `|` blocks."""
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


yaml.SafeDumper.add_representer(str, _block_strings)


def main() -> None:
    """Rewrite the PrometheusRule document (the last in monitoring.yaml) from alerts.yml."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    documents = MONITORING.read_text().split("\n---\n")
    rule = HEADER + "  " + yaml.safe_dump({"groups": groups}, sort_keys=False, width=1000).replace("\n", "\n  ")
    documents = [d for d in documents if "kind: PrometheusRule" not in d] + [rule.rstrip() + "\n"]
    MONITORING.write_text("\n---\n".join(d.rstrip("\n") for d in documents) + "\n")


if __name__ == "__main__":
    main()
