//! Prints the ControlPlaneLink CustomResourceDefinition as YAML.
//!
//! `cargo run -p cplink-operator --bin crdgen > crds/controlplanelinks.cplink.dev.yaml`

fn main() -> anyhow::Result<()> {
    print!("{}", cplink_operator::crd::crd_yaml()?);
    Ok(())
}
