//! Prints every metric family cplink-server, cplink-agent and cplink-operator export, one
//! `name type` line each, as `tests/helm/exported-metrics.txt` holds them for the chart's
//! tests (`make metric-names`; a test fails on drift).

fn main() -> anyhow::Result<()> {
    print!("{}", cplink_e2e::metrics::exported_families()?);
    Ok(())
}
