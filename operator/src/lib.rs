//! cplink-operator: runs ControlPlaneLinks — tunnel servers, per-node agents, their
//! certificates and kube-apiserver's egress configuration.
//!
//! Map of the crate, in layers: each module uses only modules listed above it.
//! - [`yaml`]: YAML out (the CRD, the egress configuration)
//! - [`crd`]: the `ControlPlaneLink` resource (spec, defaults, status) and [`crd::crd_yaml`]
//! - [`validate`]: what the schema cannot check; parses the spec into typed values
//! - [`certs`]: CA generation, leaf issuance, reuse-or-renew decisions (pure)
//! - [`resources`]: pure builders of every child object
//! - [`status`]: conditions and the Events changes of state deserve (pure)
//! - [`linked`]: how many agents each server pod has linked, read from its admin endpoint
//! - [`metrics`]: Prometheus metrics of reconciles and of leadership
//! - [`election`]: leader election among the operator's replicas, on a Lease
//! - [`reconciler`]: `Context`, `reconcile` (finalizer → apply/cleanup), `error_policy`, `run`
//! - [`app`]: command-line configuration and the operator's `run`, with its admin endpoint
//!
//! The admin endpoint, logging and signal handling are `cplink-runtime`'s, as in the server
//! and the agent.

pub mod app;
pub mod certs;
pub mod crd;
pub mod election;
pub mod linked;
pub mod metrics;
pub mod reconciler;
pub mod resources;
pub mod status;
pub mod validate;
pub mod yaml;
