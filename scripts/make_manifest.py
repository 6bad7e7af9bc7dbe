#!/usr/bin/env python
"""Write a dataset's manifest (cases, channels, labels, fixed folds) to data_manifests/, paths relative to its root.

    python scripts/make_manifest.py --adapter msd --root /data/Task04_Hippocampus \\
        --out data_manifests/Task04_Hippocampus.json
"""

import argparse
import json
from pathlib import Path

from medseg.datasets.adapters import build_manifest
from medseg.datasets.manifest import assign_folds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="msd", choices=["msd", "nnunet_raw"])
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()
    manifest = assign_folds(build_manifest(args.adapter, root=args.root, num_folds=args.folds), args.seed)
    d = manifest.to_dict()
    d["root"] = ""  # the manifest is portable: data.root says where the files are
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    out.write_text(json.dumps(d, indent=1) + "\n")
    print(f"{out}: {len(manifest.cases)} cases, {manifest.num_folds} folds")


if __name__ == "__main__":
    main()
