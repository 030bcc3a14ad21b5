"""The assets and their checks: the top-level `assets` package, loaded whole
(`load_assets_from_package_module`, `load_asset_checks_from_package_module`), so an asset or
check module added there is in the graph by being there. Loaded here, inside the defs folder,
so they are part of the project's component tree like the jobs and schedules (a reload of the
tree, as Dagster's code servers can do, keeps them)."""

import dagster as dg

import assets


@dg.definitions
def project_assets() -> dg.Definitions:
    return dg.Definitions(
        assets=dg.load_assets_from_package_module(assets),
        asset_checks=dg.load_asset_checks_from_package_module(assets),
    )
