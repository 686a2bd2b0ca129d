"""Summarise pip-audit's JSON report: fail on a known vulnerability, and say plainly how much was audited.

pip-audit exits non-zero on a vulnerability it found; a package it could not look up (no route to PyPI's
advisory data, or a version PyPI does not list) is only skipped. A machine without that route audits
nothing, and this says so instead of passing quietly.
"""

import json
import sys
from pathlib import Path

report = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
deps = report["dependencies"]
skipped = [d for d in deps if d.get("skip_reason")]
vulns = [(d["name"], d["version"], v["id"]) for d in deps for v in d.get("vulns", [])]
print(f"pip-audit: {len(deps)} packages, {len(deps) - len(skipped)} audited, {len(vulns)} known vulnerabilities")
for name, version, vuln in vulns:
    print(f"  {name} {version}: {vuln}")
if skipped:
    reason = skipped[0]["skip_reason"].split(":")[0]
    print(f"  {len(skipped)} could not be audited, e.g. {reason}")
if deps and len(skipped) == len(deps):
    print("  NOTHING WAS AUDITED: PyPI's advisory data is unreachable from this machine; run pip-audit elsewhere")
sys.exit(1 if vulns else 0)
