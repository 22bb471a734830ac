"""Helm actions for the end-to-end tests, through the real Helm engine (helm-python-sdk).

    helmctl.py install   --kubeconfig K --namespace N --release R [--values JSON]
    helmctl.py upgrade   --kubeconfig K --namespace N --release R [--values JSON]
    helmctl.py uninstall --kubeconfig K --namespace N --release R

Installs and upgrades charts/cplink. Prints the release as JSON on success; on failure prints
Helm's error on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from helm_python.config import Config
from helm_python.errors import HelmError

CHART = Path(__file__).resolve().parents[2] / "charts" / "cplink"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["install", "upgrade", "uninstall"])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--release", required=True)
    parser.add_argument("--values", default="{}", help="values as a JSON object")
    parser.add_argument("--timeout", type=int, default=120, help="seconds")
    args = parser.parse_args()
    values = json.loads(args.values)

    config = Config(kubeconfig_path=args.kubeconfig, namespace=args.namespace)
    try:
        if args.action == "install":
            release = config.install(
                str(CHART),
                args.release,
                values,
                namespace=args.namespace,
                create_namespace=True,
                timeout=args.timeout,
            )
        elif args.action == "upgrade":
            release = config.upgrade(
                str(CHART), args.release, values, namespace=args.namespace, timeout=args.timeout
            )
        else:
            release = config.uninstall(args.release, timeout=args.timeout, wait="watcher")
    except HelmError as error:
        print(f"helm {args.action} {args.release}: {error}", file=sys.stderr)
        return 1
    json.dump(release, sys.stdout, default=str)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
