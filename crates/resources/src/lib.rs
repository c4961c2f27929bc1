//! micromine's two Kubernetes resources, as types: what operators declare (`MicroMiner`) and
//! what the controller reports about each device (`EdgeDevice`). Standalone mode reads the
//! same `MicroMiner` documents from its manifests directory, so both modes accept exactly
//! the same input and refuse it with the same errors.
//!
//! # Layout
//! - `microminer`: the `MicroMiner` resource (spec, status, printer columns), its
//!   validation beyond the schema, and reading it from YAML manifests.
//! - `edgedevice`: the `EdgeDevice` resource.
//! - `selector`: Kubernetes label selectors, matched against device labels.
//! - `pool_url`: a Stratum pool's address (`stratum+tcp://`, `stratum+ssl://`).
//! - `crd`: the CustomResourceDefinitions derived from the types, as the chart ships them.

pub mod crd;
pub mod edgedevice;
pub mod microminer;
pub mod pool_url;
pub mod selector;
