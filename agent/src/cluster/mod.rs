//! What the agent reads from the cluster's Kubernetes API: the servers' EndpointSlices
//! ([`discovery`]) and its Node's pod ranges ([`node`]).

pub(crate) mod discovery;
pub(crate) mod node;
